"""Tests of hopfield_deq.py: energy structure, exact even/odd block updates, equal fixed points of all
variants, Madam, the experiment CLI end to end and a short MNIST training."""
from __future__ import annotations

import csv

import pytest
import torch

from hopfield_deq import (VARIANTS, HopfieldClassifier, HopfieldNet, chn_block_solve, hopfield_loss, load_split,
                          main, rho, rho_prime, train_epoch, evaluate)
from madam import Madam

torch.set_num_threads(1)
LAYERS = [6, 5, 4, 3, 2]  # input + 4 state layers (odd: 1, 3; even: 2, 4)


def small_net(model: str, weight_scale: float = 1.0, seed: int = 0) -> tuple[HopfieldNet, torch.Tensor]:
    torch.manual_seed(seed)
    net = HopfieldNet(LAYERS, model).double()
    with torch.no_grad():
        for p in list(net.W) + [net.U]:
            p.mul_(weight_scale)
    x = torch.rand(3, LAYERS[0], dtype=torch.float64)
    return net, net.preprocess_inputs(x)


def random_state(net: HopfieldNet, batch: int = 3) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, d, dtype=torch.float64) for d in net.layers[1:])


def dense_drive(net: HopfieldNet, ux: torch.Tensor, states) -> list[torch.Tensor]:
    """C = rho(s) W_full + b + [rho(x) U, 0, ...] with the dense symmetric matrix, split per layer."""
    flat = torch.cat(states, 1)
    bias = torch.cat(list(net.b))
    c = rho(flat) @ net.dense_weight() + bias
    c[:, :net.layers[1]] += ux
    return list(torch.split(c, net.layers[1:], dim=1))


@pytest.mark.parametrize("model", ["chn", "ham"])
def test_weight_matrix_is_symmetric_block_tridiagonal(model):
    net, ux = small_net(model)
    full = net.dense_weight()
    assert torch.equal(full, full.T)
    offsets = [0, 5, 9, 12, 14]
    for i in range(4):
        for j in range(4):
            block = full[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
            assert (block.abs().sum() > 0) == (abs(i - j) == 1)
    states = random_state(net)
    drives = dense_drive(net, ux, states)
    expected = drives if model == "ham" else [rho_prime(s) * c for s, c in zip(states, drives)]
    for got, want in zip(net.sync_map(ux, states), expected):
        assert torch.allclose(got, want, atol=1e-12)


def test_chn_sync_map_is_gradient_step_on_energy():
    """CHN: f(s) = s - dE/ds (forward Euler with unit step on ds/dt = -dE/ds)."""
    net, ux = small_net("chn")
    states = tuple(s.requires_grad_(True) for s in random_state(net))
    grads = torch.autograd.grad(net.energy(ux, states).sum(), states)
    for f_s, s, g in zip(net.sync_map(ux, states), states, grads):
        assert torch.allclose(f_s, s - g, atol=1e-12)


def test_ham_energy_gradient_vanishes_at_sync_fixed_point_structure():
    """HAM: dE/ds = rho'(s) (s - f(s)), so fixed points of f are stationary points of E."""
    net, ux = small_net("ham")
    states = tuple(s.requires_grad_(True) for s in random_state(net))
    grads = torch.autograd.grad(net.energy(ux, states).sum(), states)
    for f_s, s, g in zip(net.sync_map(ux, states), states, grads):
        assert torch.allclose(g, rho_prime(s) * (s - f_s), atol=1e-12)


def test_chn_block_solve_exact_and_differentiable():
    c = torch.cat([torch.linspace(-30, 30, 301, dtype=torch.float64), torch.tensor([0.0, 0.5, 1e-6],
                                                                                     dtype=torch.float64)])
    s = chn_block_solve(c)
    assert torch.allclose(s, rho_prime(s) * c, atol=1e-11)
    # brute force: bisection on the monotone s / rho'(s) = c (|s| <= |c|)
    lo, hi = torch.minimum(c, torch.zeros_like(c)), torch.maximum(c, torch.zeros_like(c))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        too_big = mid - rho_prime(mid) * c > 0
        lo, hi = torch.where(too_big, lo, mid), torch.where(too_big, mid, hi)
    assert torch.allclose(s, 0.5 * (lo + hi), atol=1e-10)
    c_small = torch.tensor([-2.0, -0.3, 0.2, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(chn_block_solve, (c_small,))
    s32 = chn_block_solve(c.float())
    assert torch.allclose(s32.double(), s, atol=1e-5)


@pytest.mark.parametrize("model", ["chn", "ham"])
def test_even_odd_step_is_exact_block_update(model):
    net, ux = small_net(model)
    states = random_state(net)
    even = tuple(states[i] for i in net.even)
    new_even = net.eo_map(ux, even)
    # analytic block update with the dense matrix: odd layers from the old even layers ...
    odd_drive = dense_drive(net, ux, states)
    odd = {i: odd_drive[i] if model == "ham" else chn_block_solve(odd_drive[i]) for i in net.odd}
    mixed = [odd[i] if i in odd else states[i] for i in range(net.n_states)]
    even_drive = dense_drive(net, ux, mixed)  # ... then even layers from the new odd layers
    for got, i in zip(new_even, net.even):
        want = even_drive[i] if model == "ham" else chn_block_solve(even_drive[i])
        assert torch.allclose(got, want, atol=1e-10)
    # each block step minimises the energy over that block: dE/ds_block = 0
    full = [t.clone().requires_grad_(True) for t in mixed]
    for got, i in zip(new_even, net.even):
        full[i] = got.detach().clone().requires_grad_(True)
    grads = torch.autograd.grad(net.energy(ux, full).sum(), full)
    for i in net.even:
        assert grads[i].abs().max() < 1e-9


def classifier(model: str, variant: str, tol: float) -> HopfieldClassifier:
    """Same random weights for every variant (Xavier init scaled by 0.6: a unique fixed point)."""
    torch.manual_seed(0)
    clf = HopfieldClassifier(LAYERS, model, variant, forward_iter=500, tol=tol).double()
    with torch.no_grad():
        for p in list(clf.net.W) + [clf.net.U]:
            p.mul_(0.6)
    return clf


@pytest.mark.parametrize("model", ["chn", "ham"])
def test_all_variants_reach_the_same_fixed_point(model):
    torch.manual_seed(1)
    x = torch.rand(4, LAYERS[0], dtype=torch.float64)
    solutions = {}
    for variant in VARIANTS:
        clf = classifier(model, variant, tol=1e-11)
        with torch.no_grad():
            state = clf.full_state(x)
        stats = clf.deq.last_stats
        assert stats["converged"], (variant, stats["final_residual"])
        assert len(stats["residuals"]) == stats["iterations"]
        solutions[variant] = torch.cat(state, 1)
        fx = clf.net.sync_map(clf.net.preprocess_inputs(x), state)
        assert torch.allclose(torch.cat(fx, 1), solutions[variant], atol=1e-8)  # a true fixed point
    for variant in VARIANTS[1:]:
        assert torch.allclose(solutions[variant], solutions["sync"], atol=1e-8), variant
    iters = {}
    for variant in VARIANTS:  # convergence speed to 1e-6 (same weights): EO and Anderson beat sync
        clf = classifier(model, variant, tol=1e-6)
        with torch.no_grad():
            clf(x)
        iters[variant] = clf.deq.last_stats["iterations"]
    assert iters["eo"] < iters["sync"] and iters["deq"] < iters["sync"] and iters["eo_deq"] <= iters["eo"]


def test_madam_multiplicative_update_matches_equations():
    w0 = torch.tensor([0.5, -2.0, 0.0, 1.0])
    p = torch.nn.Parameter(w0.clone())
    opt = Madam([p], lr=0.1, p_scale=1.2, g_bound=3.0)
    grad = torch.tensor([1.0, 1.0, 5.0, -2.0])
    p.grad = grad.clone()
    opt.step()
    # first step: v_hat = g^2, so g* = sign(g); w <- w exp(-lr sign(w) sign(g)), clipped at 1.2 RMS(w0)
    w_max = 1.2 * w0.pow(2).mean().sqrt()
    expected = (w0 * torch.exp(-0.1 * torch.sign(w0) * torch.sign(grad))).clamp(-w_max, w_max)
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert p[2] == 0 and p[1] == -w_max  # zero stays zero, large weight clipped, signs kept


def test_quick_cli_writes_csv_markdown_png(tmp_path):
    rows = main(["--quick", "--no_ray", "--model", "ham", "--results_dir", str(tmp_path / "res"), "--imgs_dir",
                 str(tmp_path / "imgs"), "--ray_dir", str(tmp_path / "ray"), "--num_cpus", "2"])
    assert {r["variant"] for r in rows} == set(VARIANTS)
    with open(tmp_path / "res" / "summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(VARIANTS) and all(0 <= float(r["acc_mean"]) <= 100 for r in table)
    assert (tmp_path / "res" / "runs.csv").exists()
    assert "| ham | eo_deq |" in (tmp_path / "res" / "summary.md").read_text()
    png = (tmp_path / "imgs" / "hopfield_deq_residuals.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_mnist_training_beats_chance():
    torch.manual_seed(0)
    train_x, train_y = load_split("train", 4000, None, 0)
    test_x, test_y = load_split("test", 500, None, 0)
    clf = HopfieldClassifier([784, 200, 10], "ham", "eo_deq", forward_iter=20, backward_iter=4, tol=1e-4)
    opt = Madam(clf.parameters(), lr=0.01)
    before = hopfield_loss(clf(test_x[:200]), test_y[:200]).item()
    train_epoch(clf, opt, train_x, train_y, 64, torch.Generator().manual_seed(0))
    metrics = evaluate(clf, test_x, test_y, 250)
    assert metrics["acc"] > 50.0, metrics  # chance: 10 %
    assert hopfield_loss(clf(test_x[:200]), test_y[:200]).item() < before
