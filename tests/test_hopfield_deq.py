"""Tests of hopfield_deq.py: energy structure, exact even/odd block updates, equal fixed points of all
variants, Madam, the experiment CLI end to end and a short MNIST training."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import hopfield_deq as hd
import training
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


@pytest.mark.parametrize("variant", ["deq", "eo_deq"])
def test_hopdeq_anderson_reaches_the_same_fixed_point_as_ours(variant):
    torch.manual_seed(1)
    x = torch.rand(4, LAYERS[0], dtype=torch.float64)
    states = {}
    for solver in hd.DEQ_SOLVERS:
        torch.manual_seed(0)
        clf = HopfieldClassifier(LAYERS, "chn", variant, forward_iter=500, tol=1e-11, deq_solver=solver).double()
        with torch.no_grad():
            for p in list(clf.net.W) + [clf.net.U]:
                p.mul_(0.6)
            states[solver] = torch.cat(clf.full_state(x), 1)
        assert clf.deq.forward_kwargs["solver"] == solver and clf.deq.last_stats["converged"]
        assert clf.deq.forward_kwargs["m"] == {"anderson": 5, "anderson_hopdeq": 4}[solver]
    assert torch.allclose(states["anderson"], states["anderson_hopdeq"], atol=1e-8)
    with pytest.raises(ValueError, match="deq_solver"):
        HopfieldClassifier(LAYERS, "chn", variant, deq_solver="broyden")


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


def bisect_block(c: torch.Tensor) -> torch.Tensor:
    """Reference root of s = rho'(s) c in float64 by 200 bisections on the monotone s / rho'(s) (|s| <= |c|)."""
    c = c.double()
    lo, hi = torch.minimum(c, torch.zeros_like(c)), torch.maximum(c, torch.zeros_like(c))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        too_big = mid - rho_prime(mid) * c > 0
        lo, hi = torch.where(too_big, lo, mid), torch.where(too_big, mid, hi)
    return 0.5 * (lo + hi)


def test_float32_block_solve_accurate_over_all_scales():
    """The float selections (_indicator/_select) and the g = h(c)/c table: float32 roots within 2e-6
    relative of the float64 root, for tiny, ordinary, beyond-table (|c| > 32) and huge drives, and zeros."""
    gen = torch.Generator().manual_seed(0)
    c = torch.cat([torch.randn(4000, generator=gen) * scale for scale in (1e-3, 0.05, 0.5, 3, 30, 300)]
                  + [torch.tensor([0.0, -0.0, 0.05, -0.05, 32.0, -32.0, 31.9999, 1e-30, -1e-30, 1e6, -1e6])])
    s = chn_block_solve(c)
    want = bisect_block(c)
    rel = (s.double() - want).abs() / want.abs().clamp_min(1e-300)
    assert rel.max() < 2e-6, (rel.max(), c[rel.argmax()])
    assert torch.equal(s[c == 0], torch.zeros_like(s[c == 0]))
    huge = torch.tensor([1e30, -1e30], dtype=torch.float64)  # bisect_block's 4 rho (1 - rho) underflows here
    s_huge = chn_block_solve(huge)
    a = 4.0 * (s_huge - 0.5)
    assert torch.allclose(s_huge, 4.0 * torch.sigmoid(a) * torch.sigmoid(-a) * huge, rtol=1e-10)
    assert torch.allclose(chn_block_solve(huge.float()).double(), s_huge, rtol=2e-6)
    # the table guess alone is within the solver's tolerance inside the table: one check, no Newton step
    inside = c[(c.abs() < 32) & (c.abs() > 1e-30)]
    guess = hd._table_guess(inside)
    assert ((guess.double() - want[(c.abs() < 32) & (c.abs() > 1e-30)].abs()).abs()
            / want[(c.abs() < 32) & (c.abs() > 1e-30)].abs()).max() < 1e-6


def test_float_selection_equals_where():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen) * 1e30
    x[::7] = 0.0
    for compare, op in ((torch.lt, x < 0), (torch.le, x <= 0), (torch.eq, x == 0), (torch.ne, x != 0)):
        weight = hd._indicator(compare, x, 0.0)
        assert weight.dtype == x.dtype and torch.equal(weight, op.to(x.dtype))
        assert torch.equal(hd._select(weight, x, y), torch.where(op, x, y))  # bit for bit


BAD_ARGS = [  # (argv, the flag the message must name)
    (["--runs", "0"], "--runs"), (["--epochs", "0"], "--epochs"), (["--batch_size", "0"], "--batch_size"),
    (["--forward_iter", "0"], "--forward_iter"), (["--backward_iter", "0"], "--backward_iter"),
    (["--layers", "783,100,10"], "--layers"), (["--layers", "784,100,9"], "--layers"), (["--layers", "784,10"], "--layers"),
    (["--layers", "784,0,10"], "--layers"), (["--layers", "784,a,10"], "--layers"),
    (["--layers", "784,100,100,10"], "--layers"),  # even/odd variants need an odd layer count
    (["--train_size=-5"], "--train_size"), (["--test_size=-5"], "--test_size"), (["--train_size", "60001"], "--train_size"),
    (["--test_size", "10001"], "--test_size"), (["--train_size", "10"], "--train_size"), (["--lr", "0"], "--lr"),
    (["--conv_tol", "0"], "--conv_tol"), (["--conv_tol", "1"], "--conv_tol"), (["--precision", "bf16"], "--precision"),
    (["--quick", "--full"], "--full"), (["--model", "xyz"], "--model"), (["--cpus_per_trial", "0"], "--cpus_per_trial"),
    (["--cpus_per_trial", "999"], "--cpus_per_trial"), (["--ray_address", "127.0.0.1:1"], "--ray_address"),
    (["--ray_address", "nonsense"], "--ray_address"), (["--report", "--full"], "--report"),
    (["--report", "--runs", "2"], "--runs"), (["--deq_solver", "broyden"], "--deq_solver"),
    (["--deq_solver", "anderson_hopdeq"], "--deq_solver"),  # --variant all: sync and eo have no Anderson
    (["--deq_solver", "anderson_hopdeq", "--variant", "eo"], "--deq_solver"),
    (["--no_ray", "--cpus_per_trial", "2"], "--cpus_per_trial would be ignored"),  # no Ray to reserve them
    (["--ray_address", "127.0.0.1:1", "--num_cpus", "2"], "--num_cpus 2 would be ignored"),
    (["--gpus_id", "0"], "--gpus_id 0 would be ignored"),  # no --gpus_per_trial: no trial asks for a GPU
]
if torch.cuda.device_count() == 0:
    BAD_ARGS.append((["--gpus_per_trial", "1"], "--gpus_per_trial"))


@pytest.mark.parametrize("argv, flag", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_refused_before_any_work(argv, flag, capsys, no_work, tmp_path):
    no_work((hd, "load_data"), (hd, "data_digest"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--results_dir", str(tmp_path)])
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert exit_info.value.code != 0 and flag in message, message
    assert not list(tmp_path.iterdir())


def test_explicit_flags_win_over_quick_and_full():
    args = hd.parse_args(["--quick", "--runs", "3", "--epochs", "2", "--train_size", "1000", "--forward_iter", "40"])
    assert (args.runs, args.epochs, args.train_size, args.forward_iter) == (3, 2, 1000, 40)
    assert (args.test_size, args.backward_iter) == (hd.QUICK["test_size"], hd.QUICK["backward_iter"])
    assert training.repo_relative(args.results_dir) == "results/quick/hopfield_deq"
    assert training.repo_relative(args.imgs_dir) == "results/quick/imgs"
    full = hd.parse_args(["--full"])
    assert (full.model, full.variant, full.runs, full.epochs, full.train_size, full.batch_size) == \
        ("both", "all", 3, 10, 0, 64)
    assert (full.forward_iter, full.backward_iter, full.lr, full.layers) == (40, 8, 0.01, [784, 1990, 10])
    assert training.repo_relative(full.results_dir) == "results/hopfield_deq_full"
    assert hd.parse_args(["--full", "--runs", "5", "--model", "chn"]).runs == 5
    plain = hd.parse_args([])
    assert training.repo_relative(plain.results_dir) == "results/hopfield_deq" and plain.epochs == 1
    assert "float32" in hd.build_parser().format_help()


def test_trial_identity_separates_models_variants_and_budgets():
    """--model ham --variant sync after a CHN run: other trial files (never the CHN results)."""
    chn = hd.trial_configs(hd.parse_args(["--quick"]), "d")
    ham = hd.trial_configs(hd.parse_args(["--quick", "--model", "ham", "--variant", "sync"]), "d")
    assert [(c["model"], c["variant"]) for c in chn] == [("chn", v) for v in VARIANTS]
    assert [(c["model"], c["variant"], c["precision"]) for c in ham] == [("ham", "sync", "fp32")]
    keys = {training.trial_key(c) for c in chn}
    assert training.trial_key(ham[0]) not in keys
    assert training.trial_key(hd.trial_configs(hd.parse_args(["--quick", "--variant", "sync"]), "other")[0]) not in keys
    assert hd.experiment_settings(hd.parse_args(["--quick"]), "d") == \
        hd.experiment_settings(hd.parse_args(["--quick", "--model", "ham", "--runs", "4"]), "d")
    assert "deq_solver" not in chn[0]  # ours: the keys of the runs made before the option existed stay


def test_hopdeq_solver_runs_are_other_trials_in_their_own_directory():
    ours = hd.parse_args(["--full", "--model", "chn", "--variant", "deq"])
    theirs = hd.parse_args(["--full", "--model", "chn", "--variant", "deq", "--deq_solver", "anderson_hopdeq"])
    assert training.repo_relative(theirs.results_dir) == "results/hopfield_deq_full_anderson_hopdeq"
    assert theirs.imgs_dir == theirs.results_dir and theirs.exp_name == ours.exp_name
    [config] = [c for c in hd.trial_configs(theirs, "d") if c["seed"] == 0]
    assert config["deq_solver"] == "anderson_hopdeq"
    assert training.trial_key(config) != training.trial_key(hd.trial_configs(ours, "d")[0])


def test_ray_run_trial_files_resume_and_refusal(local_ray, tmp_path, monkeypatch):
    common = ["--quick", "--epochs", "2", "--variant", "sync", "--train_size", "64", "--test_size", "64",
              "--forward_iter", "5",
              "--backward_iter", "2", "--results_dir", str(tmp_path / "res"), "--imgs_dir", str(tmp_path / "imgs"),
              "--ray_dir", str(tmp_path / "ray"), "--exp_name", "tiny"]
    rows = main(common + ["--model", "both"])
    assert [(r["model"], r["variant"], r["runs"], r["precision"]) for r in rows] == \
        [("chn", "sync", 1, "fp32"), ("ham", "sync", 1, "fp32")]
    files = sorted((tmp_path / "res" / "tiny" / "trials").glob("*.json"))
    assert (tmp_path / "res" / "tiny" / "partial").is_dir()  # epoch 1's state was saved ...
    assert not list((tmp_path / "res" / "tiny" / "partial").iterdir())  # ... and removed when the run finished
    assert [f.name.split("_seed")[0] for f in files] == ["chn_sync", "ham_sync"]
    record = json.loads(files[1].read_text())
    assert record["config"]["precision"] == "fp32" and record["config"]["data"] == hd.data_digest()
    assert 0 <= record["history"][-1]["acc"] <= 100 and record["wall_time_s"] > 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["provenance"]["n_trials"] == 2
    with open(tmp_path / "res" / "summary.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert "| ham | sync |" in (tmp_path / "res" / "summary.md").read_text()
    assert (tmp_path / "imgs" / "hopfield_deq_residuals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # HAM alone under the same experiment: served from its trial file, without the CHN row, nothing rerun
    monkeypatch.setattr(training, "_fit", lambda *a, **k: pytest.fail("a finished trial was run again"))
    again = main(common + ["--model", "ham"])
    assert [(r["model"], r["acc_mean"]) for r in again] == [("ham", rows[1]["acc_mean"])]
    for changed, setting in ((["--epochs", "3"], "epochs"), (["--train_size", "128"], "train_size"),
                             (["--forward_iter", "6"], "forward_iter")):
        with pytest.raises(SystemExit, match=setting):
            main(common + ["--model", "ham"] + changed)


def test_no_ray_run_writes_outputs(tmp_path):
    rows = main(["--quick", "--no_ray", "--model", "ham", "--variant", "eo_deq", "--train_size", "64", "--test_size",
                 "64", "--forward_iter", "5", "--backward_iter", "2", "--results_dir", str(tmp_path / "res"),
                 "--imgs_dir", str(tmp_path / "imgs")])
    assert [(r["model"], r["variant"]) for r in rows] == [("ham", "eo_deq")]
    assert not (tmp_path / "res" / hd.parse_args(["--quick"]).exp_name).exists()  # no trial files
    assert json.loads((tmp_path / "res" / "config.json").read_text())["precision"] == "fp32"


def test_full_report_counts_and_averages_the_committed_runs(tmp_path):
    experiment = tmp_path / "layers784-1990-10_epochs10_train60000"
    (experiment / "trials").mkdir(parents=True)
    settings = {"layers": [784, 1990, 10], "lr": 0.01, "epochs": 10, "batch_size": 64, "forward_iter": 40,
                "backward_iter": 8, "train_size": None, "test_size": None, "precision": "fp32"}
    (experiment / "experiment.json").write_text(json.dumps(settings))
    for seed, acc, iters, wall in ((0, 97.0, 14.0, 600.0), (1, 98.0, 16.0, 1200.0)):
        metrics = {"acc": acc, "iters": iters, "t2c": iters, "not_converged_pct": 1.0, "ms_per_batch": 40.0,
                   "train_seconds": wall - 60}
        record = {"config": {**settings, "model": "ham", "variant": "sync", "seed": seed}, "wall_time_s": wall,
                  "history": [{"acc": 10.0}, metrics], "git_commit": "abc", "cpu": "test cpu",
                  "finished": "2026-12-03T10:00:00+0000"}
        (experiment / "trials" / f"ham_sync_seed{seed}_x.json").write_text(json.dumps(record))
    table = hd.full_report(tmp_path)
    assert table.startswith("2 of 24 runs committed") and "0.5 trial hours, 10-20 min wall per run, on test cpu" in table
    assert "| ham | sync | 2 of 3 | 97.50 ± 0.71 | 15.0 ± 1.4 | 15.0 ± 1.4 |  | 1.0 | 40.0 | 840 |" in table
    assert "| chn | sync | 0 of 3 | not yet run | | | 39.1 |" in table and "| ham | eo_deq | 0 of 3 | not yet run |" in table
    assert "No paper-budget run" in hd.full_report(tmp_path / "empty")


def test_solver_report_sets_each_run_beside_ours_of_the_same_seed(tmp_path):
    settings = {"layers": [784, 1990, 10], "epochs": 2}
    for directory, solver, acc in (("full", None, 88.0), ("full_anderson_hopdeq", "anderson_hopdeq", 97.0)):
        experiment = tmp_path / directory / "exp"
        (experiment / "trials").mkdir(parents=True)
        extra = {"deq_solver": solver} if solver else {}
        (experiment / "experiment.json").write_text(json.dumps({**settings, **extra}))
        for seed in ((0,) if solver else (0, 1)):
            metrics = {"acc": acc, "iters": 10.0, "not_converged_pct": 2.0, "train_seconds": 100.0, "train_loss": 0.2}
            record = {"config": {**settings, **extra, "model": "chn", "variant": "deq", "seed": seed},
                      "history": [{"epoch": 1, "train_loss": 0.1}, metrics], "wall_time_s": 120.0}
            (experiment / "trials" / f"chn_deq_seed{seed}_x.json").write_text(json.dumps(record))
    table = hd.solver_report(tmp_path / "full")
    assert "| chn | deq | 0 | ours (anderson) | 88.00 | 0.100 0.200 | 10.0 | 2.0 | 100 |" in table
    assert "| chn | deq | 0 | hopdeq's (anderson_hopdeq) | 97.00 | 0.100 0.200 | 10.0 | 2.0 | 100 |" in table
    assert "| 1 |" not in table  # ours alone is not a comparison
    assert "No paper-budget run" in hd.solver_report(tmp_path / "nothing")


class _Interrupted(Exception):
    pass


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "ms_per_batch")}


def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    """A run stopped after its first epoch and restarted from its saved state ends with the same metrics (test
    accuracy, iterations, residual curve) and epoch reports as the uninterrupted run; a state saved for
    another config is not resumed."""
    args = hd.parse_args(["--quick", "--model", "ham", "--variant", "eo", "--epochs", "3", "--train_size", "128",
                          "--test_size", "64", "--layers", "784,32,10", "--forward_iter", "6", "--backward_iter", "2"])
    config = {**hd.trial_configs(args, hd.data_digest())[0], "cpus_per_trial": 1}
    data = hd.load_data(None)
    plain_reports: list[dict] = []
    plain = hd.train_and_evaluate(config, data, report=plain_reports.append)

    path = tmp_path / "partial" / "run.pt"
    first: list[dict] = []

    def stop_at_epoch_2(metrics: dict) -> None:
        if metrics.get("epoch") == 2:
            raise _Interrupted
        first.append(metrics)

    with pytest.raises(_Interrupted):
        hd.train_and_evaluate(config, data, report=stop_at_epoch_2, resume_path=path)
    assert path.exists() and torch.load(path, weights_only=False)["epoch"] == 1
    resumed_reports: list[dict] = []
    resumed = hd.train_and_evaluate({**config, "cpus_per_trial": 2}, data, report=resumed_reports.append,
                                    resume_path=path)  # resources are not the run's identity
    assert resumed_reports[0] == first[0]  # the saved epoch is reported again
    assert [_untimed(r) for r in resumed_reports] == [_untimed(r) for r in plain_reports]
    assert _untimed(resumed) == _untimed(plain)
    # another config (lr) ignores the saved state: it trains from scratch, as without the file
    other = {**config, "lr": config["lr"] / 2}
    fresh = hd.train_and_evaluate(other, data)
    ignored = hd.train_and_evaluate(other, data, resume_path=path)
    assert _untimed(ignored) == _untimed(fresh)
