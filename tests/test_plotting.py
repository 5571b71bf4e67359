"""Plotting.py: every quick figure is written, and its numbers obey the theory where the theory fixes them.

Theory used (unit-norm patterns, Santos et al. 2024): y_Omega(theta) of sparsemax / alpha-entmax /
alpha-normmax is one-hot iff theta_top - theta_second >= m with m = 1/(alpha-1) (entmax) or 1 (normmax),
so a pattern x_i is a fixed point iff beta * Delta_i >= m; softmax weights are never exactly zero.
The Hopfield-Fenchel-Young energy never increases along q <- X^T y(beta X q).
"""
from __future__ import annotations

import ast
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import layers
import Plotting

FIGURE_FILES = ["fig1_capacity", "fig2_noise", "fig3_convergence", "fig4_margin", "fig5_basins",
                "fig6_sparsity", "fig6_energy"]


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    Plotting.main(["--quick", "--out_dir", str(out), "--threads", "1"])
    return out


def test_every_figure_writes_png_and_csv(quick_dir):
    for name in FIGURE_FILES:
        png, csv = quick_dir / f"{name}.png", quick_dir / f"{name}.csv"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 5000, name
        assert len(pd.read_csv(csv)) > 0, name
    for extra in ("fig1_capacity_table.csv", "fig4_margin_summary.csv", "fig5_trajectories.csv",
                  "fig5_attractors.csv", "fig5_summary.csv", "figures_config.json"):
        assert (quick_dir / extra).stat().st_size > 0


def test_capacity_csv_covers_the_grid(quick_dir):
    args = Plotting.parse_args(["--quick"])
    df = pd.read_csv(quick_dir / "fig1_capacity.csv")
    panels = Plotting.panel_settings(args)
    assert len(panels) == len(args.betas) + 1 and panels[-1] == (Plotting.HU, None)
    assert len(df) == args.runs * len(args.capacity_ns) * len(panels) * len(args.mask_rows) * len(Plotting.MODES)
    assert df.success.between(0, 1).all()
    assert set(df.n_stored) == set(args.capacity_ns) and set(df.mask_rows) == set(args.mask_rows)
    assert (df[df.setting != Plotting.HU].beta == df[df.setting != Plotting.HU].beta_eff).all()


def test_noise_free_queries_of_separated_patterns_are_retrieved(quick_dir):
    """sigma = 0: the query is the stored pattern; if beta * Delta_i >= 1 sparsemax returns it exactly, so
    the success rate is at least the fraction of such patterns (patterns rebuilt as Plotting builds them)."""
    args = Plotting.parse_args(["--quick"])
    df = pd.read_csv(quick_dir / "fig2_noise.csv")
    raw, mean = Plotting.mnist_raw("train")
    subsets = Plotting.run_subsets(len(raw), args.runs, args.noise_n, args.seed + 1)
    bounds = []
    for beta in args.betas:
        for run in range(args.runs):
            patterns = Plotting.to_pattern(raw[subsets[run]], mean)
            n_q = min(args.noise_n, args.max_queries)
            separated = (beta * layers.separation(patterns)[:n_q] >= 1.0 + 1e-4).float().mean().item()
            row = df[(df.setting == f"beta={beta:g}") & (df.run == run) & (df.sigma == 0) & (df["mode"] == "sparsemax")]
            assert row.success.item() >= separated - 1e-9
            bounds.append(separated)
    assert max(bounds) > 0.5  # the bound is not vacuous


def test_margin_threshold_is_sharp(quick_dir):
    """Fixed point iff beta * Delta_i >= m: every non-fixed point lies below the margin, every fixed one above."""
    summary = pd.read_csv(quick_dir / "fig4_margin_summary.csv")
    expected = {(f, a): m for f, _, a, m in Plotting.MARGIN_MAPS}
    assert len(summary) == len(expected)
    for row in summary.itertuples():
        assert row.margin == expected[(row.family, row.alpha)]
        assert row.max_beta_delta_not_fixed < row.margin * (1 + 1e-6)
        assert row.min_beta_delta_fixed >= row.margin * (1 - 1e-6)
        # the beta grid straddles the margin (otherwise the check above would be vacuous)
        assert row.max_beta_delta_not_fixed > 0.5 * row.margin and row.min_beta_delta_fixed < 2 * row.margin
    binned = pd.read_csv(quick_dir / "fig4_margin.csv")
    below = binned[binned.bin_hi <= binned.margin]
    above = binned[binned.bin_lo >= binned.margin]
    assert (below.frac_fixed == 0).all() and (above.frac_fixed == 1).all()
    assert len(below) > 0 and len(above) > 0


def test_exact_one_step_retrieval_sparse_not_softmax(quick_dir):
    df = pd.read_csv(quick_dir / "fig3_convergence.csv")
    step1 = df[df.step == 1].set_index("mode")
    for mode in ("sparsemax", "entmax", "normmax"):
        assert step1.loc[mode, "frac_exact"] > 0.5, mode
        assert step1.loc[mode, "median_error"] == 0.0, mode
    assert (df[df["mode"] == "softmax"].frac_exact.dropna() == 0).all()
    assert (df[df["mode"] == "softmax"].median_error > 0).all()
    # 2-subsets weights are mu / 2 <= 1/2: never one pattern alone, always a mixture of >= 2
    assert (df[df["mode"] == "k_subsets"].frac_exact.dropna() == 0).all()
    assert (df[(df["mode"] == "k_subsets") & (df.step > 0)].mean_support_next >= 2).all()


@pytest.mark.parametrize("mode, margin", [("sparsemax", 1.0), ("entmax", 2.0), ("normmax", 1.0)])
def test_one_step_exact_iff_score_gap_above_margin(mode, margin):
    """Per query: q_1 == x_target exactly iff beta * (s_target - max_other s) >= m (float64, MNIST queries)."""
    raw, mean = Plotting.mnist_raw("train")
    stored = raw[:200].double()
    patterns = Plotting.to_pattern(stored, mean.double())
    queries = Plotting.noisy_query(stored[:100], mean.double(), 0.6, torch.Generator().manual_seed(0))
    beta = 12.0
    scores = beta * queries @ patterns.T
    target = scores[torch.arange(100), torch.arange(100)]
    others = scores.clone()
    others[torch.arange(100), torch.arange(100)] = -float("inf")
    gap = target - others.amax(-1)
    clear = (gap - margin).abs() > 1e-6 * margin  # skip ties with the margin (bisection tolerance)
    out = layers.retrieve(queries, patterns, beta, mode, **Plotting.MODE_PARAMS[mode])
    exact = (out == patterns[:100]).all(-1)
    assert torch.equal(exact[clear], (gap >= margin)[clear])
    assert 0 < (gap >= margin).sum() < 100  # both cases occur
    soft = layers.retrieve(queries, patterns, beta, "softmax")
    assert not (layers.association(queries, patterns, beta, "softmax") == 0).any()
    assert not (soft == patterns[:100]).all(-1).all()


def test_energy_never_increases(quick_dir):
    df = pd.read_csv(quick_dir / "fig6_energy.csv")
    assert set(df["mode"]) == set(Plotting.MODES)
    for (mode, query), d in df.groupby(["mode", "query"]):
        e = d.sort_values("step").energy.to_numpy()
        assert np.all(np.diff(e) <= 1e-9 * (1 + np.abs(e[:-1]))), (mode, query, np.diff(e).max())
        assert e[-1] < e[0]  # and it does decrease


def test_sparsemax_support_shrinks_with_beta(quick_dir):
    """support(sparsemax(beta theta)) = {i: theta_i > tau(beta)/beta}, tau/beta nondecreasing in beta."""
    df = pd.read_csv(quick_dir / "fig6_sparsity.csv")
    n = df.n_stored.iloc[0]
    for query, d in df[df["mode"] == "sparsemax"].groupby("query"):
        s = d.sort_values("beta").support.to_numpy()
        assert np.all(np.diff(s) <= 0), query
    sparse = df[df["mode"] == "sparsemax"].groupby("beta").support.mean()
    assert sparse.iloc[-1] < sparse.iloc[0] and sparse.iloc[0] < n / 4  # not a linear (dense) memory
    assert (df[df["mode"] == "softmax"].support == n).all()
    assert (df[df["mode"] == "k_subsets"].support >= 2).all()


def test_basins_sparse_reach_patterns_exactly_softmax_never(quick_dir):
    summary = pd.read_csv(quick_dir / "fig5_summary.csv").set_index(["mode", "beta"])
    cold = max(Plotting.parse_args([]).basin_betas)
    assert summary.loc[("sparsemax", cold), "frac_exact_pattern"] > 0.9
    assert (summary.loc["softmax", "frac_exact_pattern"] == 0).all()
    grid = pd.read_csv(quick_dir / "fig5_basins.csv")
    args = Plotting.parse_args(["--quick"])
    assert len(grid) == args.basin_grid ** 2
    for mode in Plotting.MODES:
        for beta in args.basin_betas:
            labels = grid[Plotting.basin_column(mode, beta)]
            assert labels.between(0, 50).all()
    attractors = pd.read_csv(quick_dir / "fig5_attractors.csv")
    mixtures = attractors[(attractors["mode"] == "k_subsets") & (attractors.kind == "mixture")]
    assert len(mixtures) >= 1  # 2-subsets converges to pattern pairs


def test_classify_attractors_groups_and_labels():
    patterns = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    final = torch.tensor([[1.0, 0.0], [1.0 + 1e-5, 0.0], [0.5, 0.5], [0.5, 0.5 + 1e-3], [0.0, 1.0]],
                         dtype=torch.float64)
    labels, attractors = Plotting.classify_attractors(final, patterns)
    assert labels.tolist() == [0, 0, 2, 2, 1]
    assert sorted(a["kind"] for a in attractors) == ["mixture", "pattern", "pattern"]


def test_queries_are_normalized_and_masked():
    raw, mean = Plotting.mnist_raw("train")
    q = Plotting.masked_query(raw[:5], mean)
    assert torch.allclose(q.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert (q.reshape(5, 28, 28)[:, 14:] == 0).all()
    x = Plotting.to_pattern(raw[:5], mean)
    assert torch.allclose(x.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert (Plotting.cosine_distance(x, x).abs() < 1e-6).all()


@pytest.mark.parametrize("mode", Plotting.MODES)
def test_energy_of_figure6_generates_the_update(mode):
    """grad_q E(q) = q - X^T y(beta X q): layers.energy is the energy whose CCCP step is layers.retrieve
    (a wrong regularizer would leave extra terms through dy/dq)."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    X = X / X.norm(dim=-1, keepdim=True)
    q = (0.5 * torch.randn(4, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    params = Plotting.MODE_PARAMS[mode]
    (grad,) = torch.autograd.grad(layers.energy(q, X, 3.0, mode, **params).sum(), q)
    expected = q - layers.retrieve(q, X, 3.0, mode, **params)
    assert torch.allclose(grad, expected, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Figures 1 and 2: what each success rate measures, and the theory beside it
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fig1_capacity", "fig2_noise"])
def test_one_step_theory_holds_in_every_row(quick_dir, name):
    """Per row (one setting, map, grid point, run), after one update: y is uniform on exactly k patterns
    iff theta_(k) - theta_(k+1) >= margin (so frac_exact == frac_past_margin); exact on a hit retrieves
    the target (or a k-set containing it) at distance 0, so success >= frac_exact_hit; k-subsets success
    needs the target among its k patterns, so success <= frac_hit.  Also in Hu et al.'s setting, whose
    theta = 1000 s / sum(s) has its own effective beta per query."""
    df = pd.read_csv(quick_dir / f"{name}.csv")
    sparse = df[df["mode"] != "softmax"]
    assert np.allclose(sparse.frac_exact, sparse.frac_past_margin, atol=1e-12, rtol=0)
    assert (df.success >= df.frac_exact_hit - 1e-12).all()
    kset = df[df["mode"] == "k_subsets"]
    assert (kset.criterion == "2-set").all() and (df[df["mode"] != "k_subsets"].criterion == "pattern").all()
    assert (kset.success <= kset.frac_hit + 1e-12).all()
    assert df[df["mode"] == "softmax"].frac_past_margin.isna().all()
    # neither bound is vacuous: both regimes occur (in Hu et al.'s setting too, for few stored patterns)
    for setting in ("beta=100", Plotting.HU) if name == "fig1_capacity" else ("beta=100",):
        d = sparse[sparse.setting == setting]
        assert (d.frac_exact_hit > 0.5).any() and (d.frac_past_margin < 0.5).any(), setting


def test_hu_setting_effective_beta_is_1000_over_the_score_sum(quick_dir):
    """theta = 1000 s / sum_j s_j: beta_eff = 1000 / sum_j <x_j, q> on raw pixels, shrinking with N."""
    raw, _ = Plotting.mnist_raw("train")
    patterns, queries = raw[:50], Plotting.mask_bottom_rows(raw[:5], 14)
    theta, b = Plotting.scaled_scores(queries, patterns, None)
    assert torch.allclose(theta.sum(-1), torch.full((5,), 1000.0))
    assert torch.allclose(b[:, 0], 1000.0 / (queries @ patterns.T).sum(-1))
    assert (queries.reshape(5, 28, 28)[:, 14:] == 0).all() and torch.equal(queries[:, :14 * 28], raw[:5, :14 * 28])
    df = pd.read_csv(quick_dir / "fig1_capacity.csv")
    hu = df[df.setting == Plotting.HU].groupby("n_stored").beta_eff.mean().sort_index()
    assert hu.is_monotonic_decreasing and hu.iloc[0] > 100 * hu.iloc[-1]
    assert df[df.setting == Plotting.HU].beta.isna().all()


def test_hu_noisy_query_is_clamped_absolute_value():
    raw, _ = Plotting.mnist_raw("train")
    q = Plotting.hu_noisy_query(raw[:4], 0.5, torch.Generator().manual_seed(0))
    noise = torch.randn(raw[:4].shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q, (raw[:4] + 0.5 * noise).abs().clamp(0, 1))
    assert torch.equal(Plotting.hu_noisy_query(raw[:4], 0.0, torch.Generator()), raw[:4])


def test_k_subsets_is_scored_on_its_k_set():
    """Orthonormal patterns e_0..e_3, y = (1/2, 1/2, 0, 0): q = (e_0 + e_1)/2 retrieves the pair {0, 1}.
    Scored as a 2-set it succeeds for targets 0 and 1 and fails for 2; scored as one pattern it would fail
    for every target (d_cos(q, e_0) = 1 - 1/sqrt(2) = 0.29 > 0.2)."""
    patterns = torch.eye(4, dtype=torch.float64)
    y = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3, dtype=torch.float64)
    out = y @ patterns
    targets = torch.tensor([0, 1, 2])
    assert Plotting.retrieval_success(out, y, patterns, targets, 2, 0.2).tolist() == [True, True, False]
    assert Plotting.retrieval_success(out, y, patterns, targets, 1, 0.2).tolist() == [False, False, False]
    # a broad mixture containing the target is no 2-set retrieval
    y_broad = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert not Plotting.retrieval_success(y_broad @ patterns, y_broad, patterns, torch.tensor([0]), 2, 0.2).item()


def test_evaluate_maps_runs_the_update_of_layers_retrieve():
    """Success of evaluate_maps == success recomputed from layers.retrieve (fixed beta, 2 steps)."""
    raw, mean = Plotting.mnist_raw("train")
    patterns = Plotting.to_pattern(raw[:300], mean)
    queries = Plotting.masked_query(raw[:40], mean, 18)
    rows = {r["mode"]: r for r in Plotting.evaluate_maps(queries, patterns, 10.0, list(Plotting.MODES), 2, 0.2)}
    for mode in ("softmax", "sparsemax", "normmax"):
        out = layers.retrieve(queries, patterns, 10.0, mode, steps=2, **Plotting.MODE_PARAMS[mode])
        expected = (Plotting.cosine_distance(out, patterns[:40]) <= 0.2).double().mean().item()
        assert rows[mode]["success"] == pytest.approx(expected, abs=1 / 40 + 1e-9), mode  # float32 ties


def capacity_reference(curve: pd.Series, level: float) -> int:
    """Largest N with success >= level at N and every smaller N (straightforward loop)."""
    capacity = 0
    for n, success in curve.sort_index().items():
        if success < level - 1e-9:
            break
        capacity = n
    return capacity


def test_capacity_table_matches_the_curves(quick_dir):
    df = pd.read_csv(quick_dir / "fig1_capacity.csv")
    table = pd.read_csv(quick_dir / "fig1_capacity_table.csv")
    args = Plotting.parse_args(["--quick"])
    assert len(table) == len(Plotting.panel_settings(args)) * len(args.mask_rows) * len(Plotting.MODES)
    assert (table.level == args.capacity_level).all()
    for row in table.itertuples():
        d = df[(df.setting == row.setting) & (df.mask_rows == row.mask_rows) & (df["mode"] == row.mode)]
        curve = d.groupby("n_stored").success.mean()
        assert row.capacity_n == capacity_reference(curve, row.level), row
        later = curve[curve.index > row.capacity_n]
        assert math.isnan(row.first_fail_n) == (len(later) == 0)
        if len(later):
            assert row.first_fail_n == later.index.min() and later.iloc[0] < row.level
    # the harder query (more rows masked) never raises the single-pattern capacity at beta = 100
    t = table[(table.setting == "beta=100") & (table.criterion == "pattern")].set_index(["mode", "mask_rows"])
    for mode in ("softmax", "sparsemax", "entmax", "normmax"):
        assert t.loc[(mode, 18), "capacity_n"] <= t.loc[(mode, 14), "capacity_n"]


def test_capacity_cells():
    row = dict(setting="beta=3", mask_rows=14, mode="sparsemax", level=0.9)
    table = pd.DataFrame([{**row, "capacity_n": 2000, "first_fail_n": 5000.0},
                          {**row, "mode": "entmax", "capacity_n": 60000, "first_fail_n": float("nan")},
                          {**row, "mode": "softmax", "capacity_n": 0, "first_fail_n": 5.0}])
    text = Plotting.report_table(table)
    assert text.splitlines()[0] == "| map | 14/28 rows masked, β=3 |"
    assert "| sparsemax | 2,000 |" in text and "| 1.5-entmax | >= 60,000 |" in text and "| softmax | < 5 |" in text


def test_readme_numbers_are_the_committed_results():
    """The README's capacity table and numbers are `python3 Plotting.py --report` of the committed imgs/."""
    out_dir = Path(Plotting.REPO_DIR) / Plotting.FULL_OUT_DIR
    table = Plotting.report_table(pd.read_csv(out_dir / "fig1_capacity_table.csv"))
    readme = (Path(Plotting.REPO_DIR) / "README.md").read_text()
    assert table in readme
    for line in Plotting.report_findings(out_dir):
        assert f"- {line}" in readme, line
    config = json.loads((out_dir / "figures_config.json").read_text())
    assert config["out_dir"] == Plotting.FULL_OUT_DIR and not config["quick"]  # written by the full run
    assert config["git_commit"] and config["wall_time_s"] > 0 and set(config["figures"]) == set(Plotting.FIGURES)


# --------------------------------------------------------------------------------------------------
# Arguments and output places
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--capacity_ns", "0"], "--capacity_ns"), (["--capacity_ns", "5", "60001"], "--capacity_ns"),
    (["--runs", "0"], "--runs"), (["--betas=-1"], "--betas"), (["--betas", "nan"], "--betas"),
    (["--steps", "0"], "--steps"), (["--threshold=-1"], "--threshold"), (["--threshold", "2.5"], "--threshold"),
    (["--sigmas=-1"], "--sigmas"), (["--threads=-3"], "--threads"), (["--mask_rows", "28"], "--mask_rows"),
    (["--capacity_level", "1.5"], "--capacity_level"), (["--max_queries", "0"], "--max_queries"),
    (["--basin_trajectories", "7"], "--basin_trajectories"), (["--conv_beta", "0"], "--conv_beta"),
    (["--runs", "61", "--noise_n", "1000"], "--noise_n"), (["--seed=-1"], "--seed"),
    (["--conv_queries", "101", "--conv_n", "100"], "--conv_queries"),
    (["--sparsity_queries", "300"], "--sparsity_queries")])
def test_bad_arguments_are_refused_up_front(argv, flag, capsys, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        Plotting.main(argv + ["--quick", "--out_dir", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    value = argv[-1].split("=")[-1] if "=" in argv[-1] else argv[-1]
    assert f"argument {flag}:" in err and value in err and "allowed:" in err, err
    assert not out.exists()  # refused before any work


def _figure_flag_reads() -> dict[str, set[str]]:
    """{flag: the figures whose code reads args.<flag>}, from the source: each figN closure of make_figures and
    the module functions it calls, followed transitively."""
    tree = ast.parse(Path(Plotting.__file__).read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}

    def reads(node: ast.AST, seen: set[str]) -> set[str]:
        found = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "args":
                found.add(sub.attr)
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in functions \
                    and sub.func.id not in seen:
                seen.add(sub.func.id)
                found |= reads(functions[sub.func.id], seen)
        return found

    figures = {node.name[3:]: node for node in functions["make_figures"].body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("fig")}
    assert set(figures) == set(Plotting.FIGURES)
    flags: dict[str, set[str]] = {}
    for figure, node in figures.items():
        for flag in reads(node, set()):
            flags.setdefault(flag, set()).add(figure)
    return flags


def test_figure_flags_name_exactly_the_figures_that_read_them():
    assert {flag: set(figures) for flag, figures in Plotting.FIGURE_FLAGS.items()} == _figure_flag_reads()


@pytest.mark.parametrize("flag, value, unread, read", [("--modes", "softmax", "4", "3"), ("--betas", "5", "3", "2"),
                                                      ("--seed", "2", "5", "6")])
def test_flags_no_chosen_figure_reads_are_refused(flag, value, unread, read, capsys):
    with pytest.raises(SystemExit) as exc:
        Plotting.parse_args(["--figures", unread, flag, value])
    assert exc.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
    Plotting.parse_args(["--figures", unread, read, flag, value])  # accepted once a chosen figure reads it


def test_smoke_runs_write_apart_from_the_committed_figures():
    quick, full = Plotting.parse_args(["--quick"]), Plotting.parse_args([])
    assert Plotting.repo_relative(quick.out_dir) == Plotting.SMOKE_OUT_DIR
    assert Plotting.repo_relative(full.out_dir) == Plotting.FULL_OUT_DIR
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{Plotting.SMOKE_OUT_DIR}/fig1_capacity.png"],
                             cwd=Plotting.REPO_DIR)
    assert ignored.returncode == 0  # gitignored
    assert Plotting.run_config(quick)["out_dir"] == Plotting.SMOKE_OUT_DIR  # logged repo-relative


def test_config_records_commit_and_wall_time(quick_dir):
    config = json.loads((quick_dir / "figures_config.json").read_text())
    assert config["quick"] and config["wall_time_s"] > 0 and set(config["timings_s"]) == set(Plotting.FIGURES)
    assert "git_commit" in config and "git_dirty" in config
