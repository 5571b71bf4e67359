"""Tests of deq.py: solvers reach fixed points, implicit gradients are exact, damping/Anderson help."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from deq import DEQ, _anderson_mix, _hopdeq_step, anderson, anderson_hopdeq, fixed_point, picard, relative_residual

torch.set_num_threads(1)


def contractive_problem(dim: int = 6, batch: int = 3, norm: float = 0.5, seed: int = 0,
                        dtype=torch.float64):
    """W with spectral norm `norm`, inputs Ux; map z -> tanh(W z + Ux) is a `norm`-contraction."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=dtype)
    w = w * (norm / torch.linalg.matrix_norm(w, ord=2))
    ux = torch.randn(batch, dim, generator=gen, dtype=dtype)
    return w, ux


def tanh_map(w, ux):
    return lambda z: torch.tanh(z @ w.T + ux)


@pytest.mark.parametrize("solver", ["picard", "anderson", "anderson_hopdeq"])
def test_solvers_reach_fixed_point_of_contraction(solver):
    w, ux = contractive_problem()
    f = tanh_map(w, ux)
    z_star, stats = fixed_point(f, torch.zeros_like(ux), solver=solver, max_iter=200, tol=1e-12)
    assert stats["converged"]
    assert torch.allclose(f(z_star), z_star, atol=1e-11)
    assert stats["residuals_per_sample"].shape == (stats["iterations"], ux.shape[0])
    assert len(stats["residuals"]) == stats["iterations"] < 200
    # unique fixed point of a contraction: both solvers agree with a long Picard run
    z = torch.zeros_like(ux)
    for _ in range(300):
        z = f(z)
    assert torch.allclose(z_star, z, atol=1e-11)


def test_no_tol_runs_all_iterations_and_logs_decreasing_residual():
    w, ux = contractive_problem(norm=0.5)
    stats = {"residuals": [], "per_sample": [], "iterations": 0}
    picard(tanh_map(w, ux), torch.zeros_like(ux), max_iter=15, tol=None, stats=stats)
    res = stats["residuals"]
    assert stats["iterations"] == 15 and len(res) == 15
    assert all(b <= 0.5 * a + 1e-15 for a, b in zip(res, res[1:]))  # contraction factor 0.5


def test_implicit_gradient_gradcheck():
    w, ux = contractive_problem(dim=4, batch=2)
    w.requires_grad_(True)
    ux.requires_grad_(True)

    def func(w_, ux_):
        z, _ = fixed_point(lambda z: torch.tanh(z @ w_.T + ux_), torch.zeros_like(ux_), solver="anderson",
                           max_iter=200, tol=1e-14, backward="implicit", backward_iter=200,
                           backward_tol=1e-14)
        return z

    assert torch.autograd.gradcheck(func, (w, ux), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backward", ["implicit", "unroll"])
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_gradients_match_backprop_through_long_unrolled_iteration(backward, solver):
    w, ux = contractive_problem(norm=0.7, seed=1)
    weights = torch.randn(ux.shape, dtype=ux.dtype, generator=torch.Generator().manual_seed(5))

    def grads(run):
        wp, up = w.clone().requires_grad_(True), ux.clone().requires_grad_(True)
        loss = (run(tanh_map(wp, up), torch.zeros_like(up)) * weights).sum()
        return torch.autograd.grad(loss, (wp, up))

    def reference(f, z):  # plain autograd through 150 Picard steps from z0
        for _ in range(150):
            z = f(z)
        return z

    def ours(f, z):
        return fixed_point(f, z, solver=solver, max_iter=150, tol=1e-13, backward=backward,
                           backward_iter=150, backward_tol=1e-13)[0]

    for g_ours, g_ref in zip(grads(ours), grads(reference)):
        assert torch.allclose(g_ours, g_ref, atol=1e-9)


def test_implicit_backward_records_adjoint_stats():
    w, ux = contractive_problem()
    w.requires_grad_(True)
    z, stats = fixed_point(tanh_map(w, ux), torch.zeros_like(ux), solver="picard", max_iter=100, tol=1e-10,
                           backward="implicit", backward_iter=100, backward_tol=1e-10)
    z.sum().backward()
    assert stats["backward"]["converged"] and stats["backward"]["iterations"] < 100
    assert w.grad is not None and torch.isfinite(w.grad).all()


def oscillating_linear_problem(dim: int = 12, seed: int = 0):
    """f(z) = A z + b, symmetric A with eigenvalues in [-1.6, 0.3]: undamped Picard diverges."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eig = torch.linspace(-1.6, 0.3, dim, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(2, dim, generator=gen, dtype=torch.float64)
    z_exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T
    return (lambda z: z @ a.T + b), z_exact


def test_damping_and_anderson_converge_where_picard_diverges():
    f, z_exact = oscillating_linear_problem()
    z0 = torch.zeros_like(z_exact)
    _, plain = fixed_point(f, z0, solver="picard", max_iter=60, tol=1e-10)
    assert not plain["converged"] and plain["residuals"][-1] > plain["residuals"][0]
    # damping d = 0.5 maps eigenvalues lambda -> 0.5 + 0.5 lambda in [-0.3, 0.65]: a contraction
    z_d, damped_stats = fixed_point(f, z0, solver="picard", max_iter=200, tol=1e-10, damping=0.5)
    assert damped_stats["converged"]
    assert torch.allclose(z_d, z_exact, atol=1e-8)
    z_a, anderson_stats = fixed_point(f, z0, solver="anderson", max_iter=200, tol=1e-10, m=5)
    assert anderson_stats["converged"]
    assert torch.allclose(z_a, z_exact, atol=1e-8)


def test_anderson_needs_fewer_iterations_than_picard():
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    w = q @ torch.diag(torch.linspace(0.0, 0.95, 40, dtype=torch.float64)) @ q.T  # slow modes ~0.95
    ux = 0.1 * torch.randn(4, 40, generator=gen, dtype=torch.float64)
    f = tanh_map(w, ux)
    _, st_p = fixed_point(f, torch.zeros_like(ux), solver="picard", max_iter=2000, tol=1e-8)
    _, st_a = fixed_point(f, torch.zeros_like(ux), solver="anderson", max_iter=2000, tol=1e-8, m=5)
    assert st_p["converged"] and st_a["converged"]
    assert st_a["iterations"] * 2 < st_p["iterations"]


def test_hopdeq_anderson_starts_with_two_picard_images():
    """x_1 = g(x_0): two iterations return g(g(x_0)), and each iteration costs one call of f."""
    w, ux = contractive_problem()
    calls = []
    f = tanh_map(w, ux)
    out = anderson_hopdeq(lambda z: calls.append(1) or f(z), torch.zeros_like(ux), max_iter=2)
    assert len(calls) == 2
    assert torch.equal(out, f(f(torch.zeros_like(ux))))


def test_hopdeq_anderson_keeps_the_last_m_iterates_including_x0():
    """With m = 2 and 4 iterations: x1 = g(x0), x2 = step([x0, x1]), x3 = step([x1, x2]), returns g(x3)."""
    w, ux = contractive_problem()
    f = tanh_map(w, ux)
    x0 = 0.1 * torch.ones_like(ux)
    x1 = f(x0)
    x2 = _hopdeq_step(torch.stack([x0, x1], 1), torch.stack([f(x0), f(x1)], 1), 1e-10)
    x3 = _hopdeq_step(torch.stack([x1, x2], 1), torch.stack([f(x1), f(x2)], 1), 1e-10)
    assert torch.equal(anderson_hopdeq(f, x0, max_iter=4, m=2), f(x3))
    assert not torch.equal(x3, f(x2))  # the mix was taken somewhere, so the history mattered


def mixed_histories(batch: int, n: int, dim: int) -> tuple[Tensor, Tensor]:
    """(B, n, D) iterate / image histories: the first half n Picard steps of affine contractions
    x -> rho Q x + c (rho from 0.05 to 0.95, Q orthogonal), where the mix lands near the fixed point, the
    second half random pairs, where it does not."""
    gen = torch.Generator().manual_seed(1)
    xs, gs = [], []
    for b in range(batch):
        if b < batch // 2:
            rho = 0.05 + 0.9 * b / max(batch // 2 - 1, 1)
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
            c, x = torch.randn(2, dim, generator=gen, dtype=torch.float64)
            hist = []
            for _ in range(n):
                hist.append((x, rho * q @ x + c))
                x = hist[-1][1]
            xs.append(torch.stack([h[0] for h in hist]))
            gs.append(torch.stack([h[1] for h in hist]))
        else:
            xs.append(torch.randn(n, dim, generator=gen, dtype=torch.float64))
            gs.append(xs[-1] + 0.3 * torch.randn(n, dim, generator=gen, dtype=torch.float64))
    return torch.stack(xs), torch.stack(gs)


def test_hopdeq_step_is_the_constrained_least_squares_mix_behind_the_picard_safeguard():
    """alpha = argmin ||sum alpha_i F_i|| s.t. sum alpha = 1 (brute force by elimination), kept only where
    ||g_last - x~|| / ||x~|| < ||g_last - x_last|| / ||x_last||; elsewhere the Picard image g_last."""
    x_hist, g_hist = mixed_histories(64, 3, 5)
    out = _hopdeq_step(x_hist, g_hist, lam=0.0)
    kept = 0
    for b in range(64):
        resid = g_hist[b] - x_hist[b]
        a = torch.linalg.lstsq(torch.stack([resid[0] - resid[2], resid[1] - resid[2]], 1), -resid[2]).solution
        x_tilde = torch.cat([a, 1 - a.sum(0, keepdim=True)]) @ g_hist[b]
        g_last, x_last = g_hist[b, -1], x_hist[b, -1]
        accept = (g_last - x_tilde).norm() / x_tilde.norm() < (g_last - x_last).norm() / x_last.norm()
        assert torch.allclose(out[b], x_tilde if accept else g_last, atol=1e-10)
        kept += int(accept)
    assert 0 < kept < 64  # both branches were exercised


def test_anderson_on_linear_map_is_exact_after_dim_plus_two_steps():
    """AA with memory > dim on an affine map finds the exact fixed point (Krylov/GMRES property)."""
    f, z_exact = oscillating_linear_problem(dim=4)
    z = anderson(f, torch.zeros_like(z_exact), max_iter=7, tol=None, m=6, lam=1e-14)
    assert torch.allclose(z, z_exact, atol=1e-7)


def test_anderson_mix_masking_gives_picard_step_and_affine_optimum():
    gen = torch.Generator().manual_seed(0)
    x_hist = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    g_hist = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    # only slot 1 valid for sample 0 -> plain Picard step g_1
    valid = torch.tensor([[False, True, False], [True, True, True]])
    mixed = _anderson_mix(g_hist - x_hist, g_hist, valid, 0.0, eye)
    assert torch.allclose(mixed[0], g_hist[0, 1])
    # sample 1: alpha minimises ||sum alpha_i F_i|| s.t. sum alpha = 1 (check against brute force)
    resid = (g_hist[1] - x_hist[1])
    a = torch.linalg.lstsq(torch.stack([resid[0] - resid[2], resid[1] - resid[2]], 1), -resid[2]).solution
    alpha = torch.cat([a, 1 - a.sum(0, keepdim=True)])
    assert torch.allclose(mixed[1], alpha @ g_hist[1], atol=1e-10)


class TwoLayerF(torch.nn.Module):
    """Tuple-state test module: z = (a, b), a <- tanh(W1 b + Ux), b <- tanh(W2 a)."""

    def __init__(self, d_in=3, d_a=4, d_b=5):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.u = torch.nn.Parameter(torch.randn(d_in, d_a, generator=gen, dtype=torch.float64))
        self.w1 = torch.nn.Parameter(0.3 * torch.randn(d_b, d_a, generator=gen, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(0.3 * torch.randn(d_a, d_b, generator=gen, dtype=torch.float64))

    def preprocess_inputs(self, x):
        return x @ self.u

    def forward(self, ux, z):
        a, b = z
        return torch.tanh(b @ self.w1 + ux), torch.tanh(a @ self.w2)


@pytest.mark.parametrize("method,solver", [("backprop", "picard"), ("full_adjoint", "anderson"),
                                           ("full_adjoint", "picard")])
def test_deq_module_tuple_state_gradients(method, solver):
    iters = 60 if method == "backprop" else 100
    grads, ref = _tuple_state_grads(dict(solver=solver, iter=iters, method=method, tol=1e-13),
                                    check_fixed_point=True)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, atol=1e-8)


def test_relative_residual_and_validation():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    fz = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert torch.allclose(relative_residual(z, fz), torch.tensor([1 / 2 ** 0.5, 0.0]))
    with pytest.raises(ValueError):
        fixed_point(lambda q: q, z, solver="newton")
    with pytest.raises(ValueError):
        fixed_point(lambda q: q, z, damping=1.0)
    with pytest.raises(ValueError, match="unknown backward solver"):
        DEQ(TwoLayerF(), None, backward_kwargs=dict(solver="broyden", method="backprop"))
    with pytest.raises(ValueError, match="unknown backward method"):
        DEQ(TwoLayerF(), None, backward_kwargs=dict(method="adjoint"))
    with pytest.raises(ValueError, match="unknown backward_solver"):
        fixed_point(lambda q: q, z, backward="unroll", backward_solver="newton")


def _tuple_state_grads(backward_kwargs: dict, damping: float = 0.2, check_fixed_point: bool = False):
    """(DEQ gradients of a + b^2 for TwoLayerF, reference through 150 undamped steps from zero);
    check_fixed_point: also assert that the forward solve converged to (a, b) = f(a, b)."""
    fmod = TwoLayerF()
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z_init = (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64))
    deq = DEQ(fmod, z_init, forward_kwargs=dict(solver="anderson", iter=100, tol=1e-13),
              backward_kwargs=backward_kwargs, damping_factor=damping)
    a, b = deq(x)
    if check_fixed_point:
        assert deq.last_stats["converged"]
        a2, b2 = fmod(fmod.preprocess_inputs(x), (a, b))
        assert torch.allclose(a, a2, atol=1e-10) and torch.allclose(b, b2, atol=1e-10)
    grads = torch.autograd.grad((a.sum() + (b ** 2).sum()), list(fmod.parameters()))
    z = (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    ux = fmod.preprocess_inputs(x)
    for _ in range(150):
        z = fmod(ux, z)
    ref = torch.autograd.grad((z[0].sum() + (z[1] ** 2).sum()), list(fmod.parameters()))
    return grads, ref


def _rel_err(grads, ref) -> float:
    return max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref))


def test_hopdeq_default_backward_backprop_through_anderson():
    """hopdeq's default backward_kwargs {"solver": "anderson", "iter": 8, "method": "backprop"} (and
    {"solver": "anderson"} alone) run unchanged: backprop through Anderson iterations from z*. The
    gradient converges to the implicit-function-theorem gradient (a long unrolled reference) as iter
    grows, and 8 iterations already carry most of it (a zero or one-step gradient would not)."""
    grads, ref = _tuple_state_grads({"solver": "anderson", "iter": 60, "method": "backprop"}, damping=0.0)
    assert _rel_err(grads, ref) < 1e-6
    grads, ref = _tuple_state_grads({"solver": "anderson", "iter": 8, "method": "backprop"}, damping=0.0)
    one_step, _ = _tuple_state_grads({"solver": "picard", "iter": 1, "method": "backprop"}, damping=0.0)
    assert _rel_err(grads, ref) < 0.2 < _rel_err(one_step, ref)
    grads, ref = _tuple_state_grads({"solver": "anderson"})  # hopdeq defaults for the rest
    assert all(torch.isfinite(g).all() for g in grads) and _rel_err(grads, ref) < 0.5


def test_anderson_falls_back_to_picard_when_extrapolation_is_bad(monkeypatch):
    """Sabotage the Anderson mixing (far-off extrapolations): the per-sample safeguard rejects them and
    takes Picard steps from the last accepted iterate, so the solver still converges."""
    import deq

    w, ux = contractive_problem(norm=0.5)
    f = tanh_map(w, ux)
    _, picard_stats = fixed_point(f, torch.zeros_like(ux), solver="picard", max_iter=200, tol=1e-10)
    honest_mix = deq._anderson_mix

    def sabotaged_mix(f_hist, g_hist, valid, lam, eye):  # a one-slot mix (= Picard step) stays honest
        return honest_mix(f_hist, g_hist, valid, lam, eye) + 100.0 * (valid.sum(1, keepdim=True) > 1)

    monkeypatch.setattr(deq, "_anderson_mix", sabotaged_mix)
    z, stats = fixed_point(f, torch.zeros_like(ux), solver="anderson", max_iter=200, tol=1e-10)
    assert stats["converged"] and stats["iterations"] <= 2 * picard_stats["iterations"] + 2
    assert torch.allclose(f(z), z, atol=1e-9)
