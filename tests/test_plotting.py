"""Plotting.py: every quick figure is written, and its numbers obey the theory where the theory fixes them.

Theory used (unit-norm patterns, Santos et al. 2024): y_Omega(theta) of sparsemax / alpha-entmax /
alpha-normmax is one-hot iff theta_top - theta_second >= m with m = 1/(alpha-1) (entmax) or 1 (normmax),
so a pattern x_i is a fixed point iff beta * Delta_i >= m; softmax weights are never exactly zero.
The Hopfield-Fenchel-Young energy never increases along q <- X^T y(beta X q).
"""
from __future__ import annotations

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
    for extra in ("fig4_margin_summary.csv", "fig5_trajectories.csv", "fig5_attractors.csv", "fig5_summary.csv",
                  "figures_config.json"):
        assert (quick_dir / extra).stat().st_size > 0


def test_capacity_csv_covers_the_grid(quick_dir):
    args = Plotting.parse_args(["--quick"])
    df = pd.read_csv(quick_dir / "fig1_capacity.csv")
    assert len(df) == args.runs * len(args.capacity_ns) * len(args.betas) * len(Plotting.MODES)
    assert df.success.between(0, 1).all()
    assert set(df.n_stored) == set(args.capacity_ns)


def test_noise_free_queries_of_separated_patterns_are_retrieved(quick_dir):
    """sigma = 0: the query is the stored pattern; if beta * Delta_i >= 1 sparsemax returns it exactly, so
    the success rate is at least the fraction of such patterns (patterns rebuilt as Plotting builds them)."""
    args = Plotting.parse_args(["--quick"])
    df = pd.read_csv(quick_dir / "fig2_noise.csv")
    raw, mean = Plotting.mnist_raw("train")
    subsets = Plotting.run_subsets(len(raw), args.runs, args.noise_n, args.seed + 1)
    for beta in args.betas:
        for run in range(args.runs):
            patterns = Plotting.to_pattern(raw[subsets[run]], mean)
            n_q = min(args.noise_n, args.max_queries)
            separated = (beta * layers.separation(patterns)[:n_q] >= 1.0 + 1e-4).float().mean().item()
            row = df[(df.beta == beta) & (df.run == run) & (df.sigma == 0) & (df["mode"] == "sparsemax")]
            assert row.success.item() >= separated - 1e-9
            assert separated > 0.5  # the bound is not vacuous


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
