"""Regenerate the theory figures of sparse / structured modern Hopfield networks into ``imgs/``.

Every curve runs the true Hopfield update of ``layers.retrieve``

    q  <-  X^T y_Omega(beta X q)

with y_Omega in {softmax, sparsemax, 1.5-entmax, 2-normmax, 2-subsets} applied to ``beta * scores``
(never to scores that were normalized first: that turns sparsemax into a linear memory).

Figures (PNG + the numbers behind each as CSV, file prefix in brackets):

1. [fig1_capacity]   MNIST memory capacity (Hu et al. 2023): success rate vs number of stored patterns,
                     queries = stored images with the bottom half masked, one update.
2. [fig2_noise]      MNIST noise robustness (Hu et al. 2023): success rate vs pixel-noise standard
                     deviation sigma, fixed number of stored patterns, one update.
3. [fig3_convergence] MNIST retrieval error vs update steps and fraction of queries retrieved exactly
                     (Santos et al. 2024: exact retrieval with sparse maps, never with softmax).
4. [fig4_margin]     Exact retrieval and the margin: fraction of stored patterns that are fixed points vs
                     beta * Delta_i for alpha-entmax (margin 1/(alpha-1)) and alpha-normmax (margin 1).
5. [fig5_basins]     Basins of attraction of a few 2D patterns (Santos et al. 2024), two betas.
6. [fig6_sparsity, fig6_energy] Mean support size of y vs beta; Hopfield-Fenchel-Young energy
                     (``layers.energy``) along update trajectories, never increasing.

MNIST preprocessing (figures 1-4, 6): each image is centered by the mean training image and scaled to
unit L2 norm, so every stored pattern lies on the unit sphere (every pattern can be a fixed point and
Delta_i = 1 - max_{j != i} <x_i, x_j>).  Queries go through the same map after corruption: masked
pixels are set to the mean image (0 after centering); noise is N(0, sigma^2) per pixel on the [0, 1]
image (not clipped).  Success: cosine distance between the retrieved q and the stored pattern
<= ``--threshold`` (0.2, as Hu et al.'s 20/100).  Hu et al.'s code applied softmax(1000 * s / sum(s))
to raw-pixel dot products s, i.e. an inverse temperature that shrinks with the number of stored
patterns; here beta is fixed and explicit: beta = 10 (hot: dense retrieval averages many patterns)
and beta = 100 (cold: every map is close to argmax), see ``--betas``.

    python3 Plotting.py                  # every figure into imgs/ (a few minutes on 2 cores)
    python3 Plotting.py --quick --out_dir /tmp/figs --figures 1 4
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

import datasets  # noqa: E402
import layers  # noqa: E402
import training  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent

MODES = ("softmax", "sparsemax", "entmax", "normmax", "k_subsets")
MODE_PARAMS = {"softmax": {}, "sparsemax": {}, "entmax": {}, "normmax": {"alpha": 2.0}, "k_subsets": {"k": 2}}
MODE_LABELS = {"softmax": "softmax", "sparsemax": "sparsemax", "entmax": "1.5-entmax",
               "normmax": "2-normmax", "k_subsets": "2-subsets"}
MODE_COLORS = {"softmax": "tab:blue", "sparsemax": "tab:orange", "entmax": "tab:green",
               "normmax": "tab:red", "k_subsets": "tab:purple"}
MODE_STYLES = {"softmax": ("o", "-"), "sparsemax": ("s", "--"), "entmax": ("^", "-."), "normmax": ("v", ":"),
               "k_subsets": ("D", "-")}  # (marker, line style): overlapping curves stay visible
FIGURES = ("1", "2", "3", "4", "5", "6")

# Figure 4: (family, mode, alpha, margin) with margin = 1/(alpha-1) for entmax, 1 for normmax.
MARGIN_MAPS = (("entmax", "entmax_alpha", 1.25, 4.0), ("entmax", "entmax_alpha", 1.5, 2.0),
               ("entmax", "entmax_alpha", 2.0, 1.0), ("normmax", "normmax", 2.0, 1.0),
               ("normmax", "normmax", 5.0, 1.0))


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
FULL = dict(
    capacity_ns=[5, 10, 20, 50, 100, 200, 300, 500, 700, 1000, 1500, 2000, 2500, 3000], runs=5,
    max_queries=1000, noise_n=1000, sigmas=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5],
    conv_n=1000, conv_queries=500, conv_steps=10, margin_n=300, margin_betas=48,
    basin_grid=161, basin_steps=60, basin_trajectories=6, sparsity_n=1000, sparsity_queries=200,
    sparsity_betas=25, energy_queries=12, energy_steps=25)
QUICK = dict(
    capacity_ns=[5, 20, 100, 300], runs=2, max_queries=100, noise_n=200, sigmas=[0.0, 0.5, 1.5],
    conv_n=100, conv_queries=60, conv_steps=5, margin_n=60, margin_betas=24,
    basin_grid=31, basin_steps=30, basin_trajectories=3, sparsity_n=200, sparsity_queries=32,
    sparsity_betas=10, energy_queries=6, energy_steps=12)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(REPO_DIR / "imgs"), help="where PNG/CSV/JSON go")
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES,
                        help="which figures to make (default: all)")
    parser.add_argument("--quick", action="store_true", help="small settings for tests/smoke runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--betas", nargs="+", type=float, default=[10.0, 100.0],
                        help="inverse temperatures of the MNIST capacity / noise figures (one panel each)")
    parser.add_argument("--threshold", type=float, default=0.2,
                        help="success iff cosine distance(retrieved, stored pattern) <= threshold")
    parser.add_argument("--steps", type=int, default=1, help="update steps in figures 1 and 2")
    parser.add_argument("--conv_beta", type=float, default=30.0, help="beta of figure 3")
    parser.add_argument("--conv_sigma", type=float, default=0.5, help="pixel noise of the queries of figure 3")
    parser.add_argument("--basin_betas", nargs=2, type=float, default=[2.0, 8.0], help="betas of figure 5")
    parser.add_argument("--energy_beta", type=float, default=2.0, help="beta of the energy panel")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch default)")
    for name, value in FULL.items():  # every size can be overridden; default: FULL or QUICK
        kind = type(value[0]) if isinstance(value, list) else type(value)
        parser.add_argument(f"--{name}", type=kind, nargs="+" if isinstance(value, list) else None,
                            default=None, help=f"default {value} ({QUICK[name]} with --quick)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# --------------------------------------------------------------------------------------------------
# Data: MNIST patterns and corrupted queries
# --------------------------------------------------------------------------------------------------
def mnist_raw(split: str = "train") -> tuple[Tensor, Tensor]:
    """Flattened MNIST images (N, 784) in [0, 1] and the mean image (784,)."""
    images, _ = datasets.load_mnist(split)
    raw = torch.from_numpy(np.array(images, dtype=np.float32)).reshape(len(images), -1)
    return raw, raw.mean(0)


def to_pattern(raw: Tensor, mean: Tensor) -> Tensor:
    """x = (image - mean) / ||image - mean||: centered, unit L2 norm."""
    centered = raw - mean
    return centered / centered.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def masked_query(raw: Tensor, mean: Tensor, keep_rows: int = 14) -> Tensor:
    """Query with the bottom 28 - keep_rows image rows replaced by the mean image, then normalized."""
    centered = (raw - mean).reshape(-1, 28, 28).clone()
    centered[:, keep_rows:, :] = 0.0
    centered = centered.reshape(raw.shape)
    return centered / centered.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def noisy_query(raw: Tensor, mean: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Query = pattern map of image + N(0, sigma^2) pixel noise (sigma = standard deviation)."""
    noise = torch.randn(raw.shape, generator=generator, dtype=raw.dtype)
    return to_pattern(raw + sigma * noise, mean)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - <a, b> / (||a|| ||b||), row-wise."""
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def run_subsets(n_images: int, runs: int, size: int, seed: int) -> list[Tensor]:
    """Disjoint random index sets (one per run) of ``size`` images each."""
    if runs * size > n_images:
        raise ValueError(f"{runs} runs x {size} patterns exceed the {n_images} available images")
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    return [perm[r * size:(r + 1) * size] for r in range(runs)]


def one_step_success(queries: Tensor, targets: Tensor, patterns: Tensor, beta: float, mode: str,
                     steps: int, threshold: float) -> float:
    """Fraction of queries whose retrieval lies within ``threshold`` cosine distance of its target."""
    out = layers.retrieve(queries, patterns, beta, mode, steps=steps, **MODE_PARAMS[mode])
    return (cosine_distance(out, targets) <= threshold).float().mean().item()


def support_size(y: Tensor) -> Tensor:
    """Number of exactly non-zero weights per row."""
    return (y > 0).sum(-1)


# --------------------------------------------------------------------------------------------------
# Figure 1 and 2: capacity and noise robustness on MNIST
# --------------------------------------------------------------------------------------------------
def capacity_experiment(args: argparse.Namespace, raw: Tensor, mean: Tensor) -> pd.DataFrame:
    """Success rate per (beta, mode, number stored, run); queries: bottom half masked."""
    rows = []
    subsets = run_subsets(len(raw), args.runs, max(args.capacity_ns), args.seed)
    tasks = [(r, n) for r in range(args.runs) for n in args.capacity_ns]
    for run, n in tqdm(tasks, desc="fig1 capacity", leave=False):
        stored_raw = raw[subsets[run][:n]]
        patterns = to_pattern(stored_raw, mean)
        n_q = min(n, args.max_queries)
        queries = masked_query(stored_raw[:n_q], mean)
        for beta in args.betas:
            for mode in args.modes:
                rate = one_step_success(queries, patterns[:n_q], patterns, beta, mode, args.steps, args.threshold)
                rows.append(dict(beta=beta, mode=mode, n_stored=n, run=run, n_queries=n_q, success=rate))
    return pd.DataFrame(rows)


def noise_experiment(args: argparse.Namespace, raw: Tensor, mean: Tensor) -> pd.DataFrame:
    """Success rate per (beta, mode, sigma, run) with ``noise_n`` stored patterns."""
    rows = []
    subsets = run_subsets(len(raw), args.runs, args.noise_n, args.seed + 1)
    tasks = [(r, s) for r in range(args.runs) for s in args.sigmas]
    for run, sigma in tqdm(tasks, desc="fig2 noise", leave=False):
        stored_raw = raw[subsets[run]]
        patterns = to_pattern(stored_raw, mean)
        n_q = min(args.noise_n, args.max_queries)
        generator = torch.Generator().manual_seed(args.seed * 1000 + run)
        queries = noisy_query(stored_raw[:n_q], mean, sigma, generator)
        for beta in args.betas:
            for mode in args.modes:
                rate = one_step_success(queries, patterns[:n_q], patterns, beta, mode, args.steps, args.threshold)
                rows.append(dict(beta=beta, mode=mode, sigma=sigma, run=run, n_queries=n_q, success=rate))
    return pd.DataFrame(rows)


def line_style(mode: str) -> dict:
    """Matplotlib keywords of a mode's curve (same color/marker/line style in every figure)."""
    marker, style = MODE_STYLES[mode]
    return dict(marker=marker, ls=style, ms=4, lw=1.6, color=MODE_COLORS[mode], label=MODE_LABELS[mode],
                markerfacecolor="none" if mode != "softmax" else MODE_COLORS[mode])


def plot_success_curves(df: pd.DataFrame, x: str, xlabel: str, title: str, path: Path,
                        modes: list[str], logx: bool = False) -> None:
    """One panel per beta: mean +- std over runs of the success rate per mode."""
    betas = sorted(df.beta.unique())
    fig, axes = plt.subplots(1, len(betas), figsize=(5.2 * len(betas), 4.2), squeeze=False, sharey=True)
    for ax, beta in zip(axes[0], betas):
        for mode in modes:
            stats = df[(df.beta == beta) & (df["mode"] == mode)].groupby(x).success.agg(["mean", "std"])
            std = stats["std"].fillna(0.0)
            ax.plot(stats.index, stats["mean"], **line_style(mode))
            ax.fill_between(stats.index, stats["mean"] - std, stats["mean"] + std, color=MODE_COLORS[mode],
                            alpha=0.2)
        ax.set_title(f"{title}, $\\beta$ = {beta:g}")
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("retrieval success rate")
    axes[0, -1].legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Figure 3: error vs update steps, exact retrieval
# --------------------------------------------------------------------------------------------------
def convergence_experiment(args: argparse.Namespace, raw: Tensor, mean: Tensor) -> pd.DataFrame:
    """Per mode and step t: error ||q_t - x_target||, and the fraction of queries retrieved exactly, i.e.
    whose association y(q_{t-1}) is one-hot on the target (so q_t = x_target with no rounding: float64,
    where softmax weights exp(-beta * gap) >= exp(-2 beta) never underflow for beta < 350)."""
    (idx,) = run_subsets(len(raw), 1, args.conv_n, args.seed + 2)
    stored_raw = raw[idx].double()
    patterns = to_pattern(stored_raw, mean.double())
    generator = torch.Generator().manual_seed(args.seed + 3)
    n_q = min(args.conv_queries, args.conv_n)
    targets = patterns[:n_q]
    q0 = noisy_query(stored_raw[:n_q], mean.double(), args.conv_sigma, generator)
    one_hot_target = torch.nn.functional.one_hot(torch.arange(n_q), args.conv_n).bool()
    rows = []
    for mode in tqdm(args.modes, desc="fig3 convergence", leave=False):
        params = MODE_PARAMS[mode]
        q = q0
        for step in range(args.conv_steps + 1):
            error = (q - targets).norm(dim=-1)
            y = layers.association(q, patterns, args.conv_beta, mode, **params)
            rows.append(dict(mode=mode, step=step, mean_error=error.mean().item(),
                             median_error=error.median().item(),
                             frac_exact=float("nan") if step == 0 else exact.double().mean().item(),
                             mean_support_next=support_size(y).double().mean().item()))
            exact = ((y > 0) == one_hot_target).all(-1) & (y[one_hot_target] == 1.0)
            q = layers.retrieve(q, patterns, args.conv_beta, mode, steps=1, **params)
    return pd.DataFrame(rows)


def plot_convergence(df: pd.DataFrame, args: argparse.Namespace, path: Path) -> None:
    floor = 1e-17
    fig, (ax_err, ax_exact) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in args.modes:
        d = df[df["mode"] == mode]
        ax_err.plot(d.step, d.median_error.clip(lower=floor), **line_style(mode))
        e = d[d.step > 0]
        ax_exact.plot(e.step, e.frac_exact, **line_style(mode))
    ax_err.set_yscale("log")
    ax_err.set_xlabel("update steps t")
    ax_err.set_ylabel("median $\\|q_t - x_{target}\\|$ over queries (0 drawn at 1e-17)")
    ax_err.set_title(f"retrieval error, MNIST, $\\beta$={args.conv_beta:g}, noise std {args.conv_sigma:g}")
    ax_exact.set_xlabel("update steps t")
    ax_exact.set_ylabel("fraction retrieved exactly ($q_t = x_{target}$)")
    ax_exact.set_title("exact retrieval: $y(q_{t-1})$ one-hot on the target")
    ax_exact.set_ylim(-0.02, 1.02)
    never = [MODE_LABELS[m] for m in args.modes if (df[df["mode"] == m].frac_exact.dropna() == 0).all()]
    if never:
        ax_exact.text(0.5, 0.06, f"never exact: {', '.join(never)}", transform=ax_exact.transAxes, ha="center",
                      fontsize=9)
    ax_err.axhline(floor, color="grey", ls=":", lw=1)
    ax_err.text(0.98, 0.08, "error exactly 0 (sparse maps)", transform=ax_err.transAxes, ha="right", va="bottom",
                fontsize=8, color="grey")
    for ax in (ax_err, ax_exact):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_exact.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Figure 4: exact retrieval and the margin
# --------------------------------------------------------------------------------------------------
def margin_bins() -> np.ndarray:
    """Log2-spaced bin edges (4 per octave) of beta * Delta; every margin 1/(alpha-1) in MARGIN_MAPS is an edge."""
    return 2.0 ** (np.arange(-16, 21) / 4.0)


def margin_experiment(args: argparse.Namespace, raw: Tensor, mean: Tensor) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each map and beta: is each stored pattern x_i a fixed point, retrieve(x_i) == x_i exactly?

    Theory (Santos et al. 2024): y_Omega(beta X x_i) is one-hot iff beta * Delta_i >= m (the map's margin),
    so with unit-norm patterns x_i is a fixed point iff beta * Delta_i >= m.
    Returns (binned fraction of fixed points, per-map summary of the measured threshold).
    """
    (idx,) = run_subsets(len(raw), 1, args.margin_n, args.seed + 4)
    patterns = to_pattern(raw[idx].double(), mean.double())
    delta = layers.separation(patterns)
    positive = delta > 0  # exact duplicates (Delta = 0) can never be separated
    edges = margin_bins()
    betas = np.geomspace(edges[0] / delta[positive].max().item(), edges[-1] / delta[positive].min().item(),
                         args.margin_betas)
    binned, summary = [], []
    for family, mode, alpha, margin in tqdm(MARGIN_MAPS, desc="fig4 margin", leave=False):
        bd_all, fixed_all = [], []
        for beta in betas:
            out = layers.retrieve(patterns, patterns, float(beta), mode, steps=1, alpha=alpha)
            fixed = (out == patterns).all(-1)
            bd_all.append((beta * delta)[positive])
            fixed_all.append(fixed[positive])
        bd, fixed = torch.cat(bd_all).numpy(), torch.cat(fixed_all).numpy()
        which = np.digitize(bd, edges)
        for b in range(1, len(edges)):
            sel = which == b
            if sel.any():
                binned.append(dict(family=family, alpha=alpha, margin=margin, bin_lo=edges[b - 1], bin_hi=edges[b],
                                   frac_fixed=fixed[sel].mean(), count=int(sel.sum())))
        summary.append(dict(family=family, alpha=alpha, margin=margin,
                            max_beta_delta_not_fixed=float(bd[~fixed].max()) if (~fixed).any() else float("nan"),
                            min_beta_delta_fixed=float(bd[fixed].min()) if fixed.any() else float("nan"),
                            n_points=len(bd), n_patterns=int(positive.sum())))
    return pd.DataFrame(binned), pd.DataFrame(summary)


def plot_margin(binned: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.get_cmap("viridis")
    for ax, family in zip(axes, ("entmax", "normmax")):
        d = binned[binned.family == family]
        alphas = sorted(d.alpha.unique())
        for i, alpha in enumerate(alphas):
            da = d[d.alpha == alpha]
            color = colors(i / max(1, len(alphas) - 1) * 0.85)
            centers = np.sqrt(da.bin_lo * da.bin_hi)
            ax.plot(centers, da.frac_fixed, "o-", ms=3, color=color, label=f"$\\alpha$ = {alpha:g}")
            margin = da.margin.iloc[0]
            ax.axvline(margin, color=color, ls="--", lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("$\\beta \\Delta_i$  (separation $\\Delta_i = \\|x_i\\|^2 - \\max_{j\\neq i} x_i^T x_j$)")
        name = "$\\alpha$-entmax, margin m = 1/($\\alpha$-1)" if family == "entmax" else "$\\alpha$-normmax, margin m = 1"
        ax.set_title(f"{name} (dashed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction of patterns that are fixed points")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Figure 5: basins of attraction in 2D
# --------------------------------------------------------------------------------------------------
def basin_patterns() -> Tensor:
    """Five fixed 2D patterns (a pentagon of radii 0.7-1.1, float64)."""
    angles = torch.tensor([0.3, 1.5, 2.6, 3.9, 5.1], dtype=torch.float64)
    radii = torch.tensor([1.0, 0.8, 1.1, 0.9, 0.7], dtype=torch.float64)
    return torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=-1)


def classify_attractors(final: Tensor, patterns: Tensor, tol: float = 0.1,
                        merge: float = 0.02) -> tuple[np.ndarray, list[dict]]:
    """Label each final state by its attractor. Final states are grouped greedily (a state within ``merge``
    of a group's first state joins it); a group whose state lies within ``tol`` of a stored pattern gets
    that pattern's index, other groups are metastable states (mixtures), numbered from len(patterns)."""
    uniq, inverse = torch.unique(torch.round(final * 1e4) / 1e4, dim=0, return_inverse=True)
    representatives: list[Tensor] = []
    group_of_uniq = []
    for u in uniq:
        dists = [float((u - r).norm()) for r in representatives]
        if dists and min(dists) < merge:
            group_of_uniq.append(int(np.argmin(dists)))
        else:
            representatives.append(u)
            group_of_uniq.append(len(representatives) - 1)
    attractors, label_of_group, n_mix = [], [], 0
    for rep in representatives:
        nearest_d, nearest = (patterns - rep).norm(dim=-1).min(0)
        if nearest_d < tol:
            label, kind = int(nearest), "pattern"
        else:
            label, kind = len(patterns) + n_mix, "mixture"
            n_mix += 1
        label_of_group.append(label)
        attractors.append(dict(label=label, kind=kind, x=rep[0].item(), y=rep[1].item()))
    labels_of_uniq = np.asarray(label_of_group)[np.asarray(group_of_uniq)]
    return labels_of_uniq[inverse.numpy()], attractors


def basin_column(mode: str, beta: float) -> str:
    return f"{mode}@beta={beta:g}"


def basin_experiment(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Grid of initial queries in [-1.5, 1.5]^2 iterated ``basin_steps`` times per (mode, beta).

    Returns (grid: x0, y0 and one attractor-label column per (mode, beta); trajectories; attractors;
    summary per (mode, beta): fraction of grid points whose final state equals a stored pattern bit for bit).
    """
    patterns = basin_patterns()
    axis = torch.linspace(-1.5, 1.5, args.basin_grid, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)
    starts = torch.tensor([[-1.3, 1.3], [1.3, 1.3], [1.3, -1.3], [-1.3, -1.3], [0.05, 0.0], [-1.4, 0.2]],
                          dtype=torch.float64)[:args.basin_trajectories]
    grid_df = pd.DataFrame({"x0": grid[:, 0].numpy().round(6), "y0": grid[:, 1].numpy().round(6)})
    traj_rows, attr_rows, summary_rows = [], [], []
    tasks = [(mode, beta) for beta in args.basin_betas for mode in args.modes]
    for mode, beta in tqdm(tasks, desc="fig5 basins", leave=False):
        final = layers.retrieve(grid, patterns, beta, mode, steps=args.basin_steps, **MODE_PARAMS[mode])
        labels, attractors = classify_attractors(final, patterns)
        grid_df[basin_column(mode, beta)] = labels
        exact = (final[:, None, :] == patterns[None]).all(-1).any(-1)
        summary_rows.append(dict(mode=mode, beta=beta, frac_exact_pattern=exact.double().mean().item(),
                                 n_pattern_attractors=sum(a["kind"] == "pattern" for a in attractors),
                                 n_mixtures=sum(a["kind"] == "mixture" for a in attractors)))
        for a in attractors:
            attr_rows.append(dict(mode=mode, beta=beta, **a))
        q = starts
        for step in range(args.basin_steps + 1):
            for t, (x, y) in enumerate(q.tolist()):
                traj_rows.append(dict(mode=mode, beta=beta, trajectory=t, step=step, x=round(x, 6), y=round(y, 6)))
            q = layers.retrieve(q, patterns, beta, mode, steps=1, **MODE_PARAMS[mode])
    return grid_df, pd.DataFrame(traj_rows), pd.DataFrame(attr_rows), pd.DataFrame(summary_rows)


def plot_basins(grid_df: pd.DataFrame, traj_df: pd.DataFrame, attr_df: pd.DataFrame,
                args: argparse.Namespace, path: Path) -> None:
    patterns = basin_patterns().numpy()
    n_pat = len(patterns)
    pattern_colors = plt.get_cmap("tab10")(np.arange(n_pat))
    mixture_greys = np.linspace(0.55, 0.9, 6)  # metastable states: grey levels
    betas, modes = args.basin_betas, args.modes
    fig, axes = plt.subplots(len(betas), len(modes), figsize=(3.0 * len(modes), 3.1 * len(betas)),
                             squeeze=False)
    for r, beta in enumerate(betas):
        for c, mode in enumerate(modes):
            ax = axes[r, c]
            side = int(round(math.sqrt(len(grid_df))))
            labels = grid_df[basin_column(mode, beta)].to_numpy().reshape(side, side)
            rgb = np.zeros((side, side, 3))
            for lab in np.unique(labels):
                color = (pattern_colors[lab][:3] * 0.6 + 0.4) if lab < n_pat \
                    else np.full(3, mixture_greys[(lab - n_pat) % len(mixture_greys)])
                rgb[labels == lab] = color
            ax.imshow(rgb, origin="lower", extent=(-1.5, 1.5, -1.5, 1.5), interpolation="nearest")
            a = attr_df[(attr_df["mode"] == mode) & (attr_df.beta == beta) & (attr_df.kind == "mixture")]
            ax.scatter(a.x, a.y, marker="X", s=40, c="k", zorder=4, label="metastable state (> 0.1 from every pattern)")
            ax.scatter(patterns[:, 0], patterns[:, 1], marker="*", s=110, c=pattern_colors, edgecolors="k",
                       zorder=5, label="stored pattern")
            t = traj_df[(traj_df["mode"] == mode) & (traj_df.beta == beta)]
            for _, tr in t.groupby("trajectory"):
                ax.plot(tr.x, tr.y, "-", color="k", lw=0.9, zorder=3)
                ax.plot(tr.x.iloc[0], tr.y.iloc[0], "o", color="k", ms=3, zorder=3)
            ax.set_title(f"{MODE_LABELS[mode]}, $\\beta$={beta:g}", fontsize=10)
            ax.set_xticks([-1, 0, 1])
            ax.set_yticks([-1, 0, 1])
    axes[0, 0].legend(loc="lower left", fontsize=6, framealpha=0.8)
    fig.suptitle("Basins of attraction: color = attractor reached from each initial query "
                 "(stored pattern; grey tones = metastable mixtures); lines = trajectories", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Figure 6: sparsity and energy
# --------------------------------------------------------------------------------------------------
def sparsity_experiment(args: argparse.Namespace, raw: Tensor, mean: Tensor) -> pd.DataFrame:
    """Support size of y_Omega(beta X q) per query and beta (float64: softmax keeps full support)."""
    (idx,) = run_subsets(len(raw), 1, args.sparsity_n, args.seed + 5)
    stored_raw = raw[idx].double()
    patterns = to_pattern(stored_raw, mean.double())
    n_q = min(args.sparsity_queries, args.sparsity_n)
    queries = masked_query(stored_raw[:n_q], mean.double())
    rows = []
    for mode in tqdm(args.modes, desc="fig6 sparsity", leave=False):
        for beta in np.geomspace(1.0, 300.0, args.sparsity_betas):
            y = layers.association(queries, patterns, float(beta), mode, **MODE_PARAMS[mode])
            for qi, s in enumerate(support_size(y).tolist()):
                rows.append(dict(mode=mode, beta=round(float(beta), 6), query=qi, support=s,
                                 n_stored=args.sparsity_n))
    return pd.DataFrame(rows)


def energy_experiment(args: argparse.Namespace) -> pd.DataFrame:
    """E(q_t) (layers.energy) along trajectories on synthetic patterns: 24 unit-norm Gaussian patterns in
    d = 16 and random queries, float64."""
    gen = torch.Generator().manual_seed(args.seed + 6)
    patterns = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    patterns = patterns / patterns.norm(dim=-1, keepdim=True)
    q0 = 0.15 * torch.randn(args.energy_queries, 16, generator=gen, dtype=torch.float64)
    rows = []
    for mode in args.modes:
        q = q0
        for step in range(args.energy_steps + 1):
            e = layers.energy(q, patterns, args.energy_beta, mode, **MODE_PARAMS[mode])
            for qi, val in enumerate(e.tolist()):
                rows.append(dict(mode=mode, beta=args.energy_beta, query=qi, step=step, energy=val))
            q = layers.retrieve(q, patterns, args.energy_beta, mode, steps=1, **MODE_PARAMS[mode])
    return pd.DataFrame(rows)


def plot_sparsity(df: pd.DataFrame, args: argparse.Namespace, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for mode in args.modes:
        stats = df[df["mode"] == mode].groupby("beta").support.mean()
        ax.plot(stats.index, stats.values, **line_style(mode))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("$\\beta$")
    ax.set_ylabel("mean support size of $y_\\Omega(\\beta X q)$")
    ax.set_title(f"sparsity, MNIST, N = {df.n_stored.iloc[0]} stored, masked queries", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_energy(df: pd.DataFrame, args: argparse.Namespace, path: Path) -> None:
    fig, axes = plt.subplots(1, len(args.modes), figsize=(3.0 * len(args.modes), 3.3), squeeze=False)
    for ax, mode in zip(axes[0], args.modes):
        for _, d in df[df["mode"] == mode].groupby("query"):
            ax.plot(d.step, d.energy, "-", lw=1, color=MODE_COLORS[mode], alpha=0.8)
        ax.set_title(MODE_LABELS[mode], fontsize=10)
        ax.set_xlabel("update step t")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("energy $E(q_t)$")
    fig.suptitle(f"Hopfield-Fenchel-Young energy along updates (24 random patterns, d = 16, "
                 f"$\\beta$ = {args.energy_beta:g}): never increases", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def save(df: pd.DataFrame, out_dir: Path, name: str, written: list[Path]) -> None:
    path = out_dir / f"{name}.csv"
    df.to_csv(path, index=False)
    written.append(path)


def make_figures(args: argparse.Namespace) -> list[Path]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    needs_mnist = set(args.figures) & {"1", "2", "3", "4", "6"}
    raw, mean = mnist_raw("train") if needs_mnist else (None, None)
    timings = {}

    def timed(name: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"figure {name}: {timings[name]:.1f} s")

    def fig1():
        df = capacity_experiment(args, raw, mean)
        save(df, out_dir, "fig1_capacity", written)
        plot_success_curves(df, "n_stored", "number of stored MNIST patterns", "memory capacity",
                            out_dir / "fig1_capacity.png", args.modes, logx=True)
        written.append(out_dir / "fig1_capacity.png")

    def fig2():
        df = noise_experiment(args, raw, mean)
        save(df, out_dir, "fig2_noise", written)
        plot_success_curves(df, "sigma", "noise standard deviation $\\sigma$ (pixels in [0, 1])",
                            f"noise robustness, N = {args.noise_n}", out_dir / "fig2_noise.png", args.modes)
        written.append(out_dir / "fig2_noise.png")

    def fig3():
        df = convergence_experiment(args, raw, mean)
        save(df, out_dir, "fig3_convergence", written)
        plot_convergence(df, args, out_dir / "fig3_convergence.png")
        written.append(out_dir / "fig3_convergence.png")

    def fig4():
        binned, summary = margin_experiment(args, raw, mean)
        save(binned, out_dir, "fig4_margin", written)
        save(summary, out_dir, "fig4_margin_summary", written)
        plot_margin(binned, out_dir / "fig4_margin.png")
        written.append(out_dir / "fig4_margin.png")

    def fig5():
        grid_df, traj_df, attr_df, summary = basin_experiment(args)
        save(grid_df, out_dir, "fig5_basins", written)
        save(summary, out_dir, "fig5_summary", written)
        save(traj_df, out_dir, "fig5_trajectories", written)
        save(attr_df, out_dir, "fig5_attractors", written)
        plot_basins(grid_df, traj_df, attr_df, args, out_dir / "fig5_basins.png")
        written.append(out_dir / "fig5_basins.png")

    def fig6():
        sparsity = sparsity_experiment(args, raw, mean)
        save(sparsity, out_dir, "fig6_sparsity", written)
        plot_sparsity(sparsity, args, out_dir / "fig6_sparsity.png")
        energy = energy_experiment(args)
        save(energy, out_dir, "fig6_energy", written)
        plot_energy(energy, args, out_dir / "fig6_energy.png")
        written.extend([out_dir / "fig6_sparsity.png", out_dir / "fig6_energy.png"])

    makers = {"1": fig1, "2": fig2, "3": fig3, "4": fig4, "5": fig5, "6": fig6}
    for name in FIGURES:
        if name in args.figures:
            timed(name, makers[name])
    config_path = out_dir / "figures_config.json"  # timings of figures made by earlier runs are kept
    previous = json.loads(config_path.read_text()).get("timings_s", {}) if config_path.exists() else {}
    config_path.write_text(json.dumps({**vars(args), "timings_s": {**previous, **timings}}, indent=2,
                                      default=str))
    written.append(out_dir / "figures_config.json")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    training.log_config(args)
    start = time.perf_counter()
    written = make_figures(args)
    print(f"done in {time.perf_counter() - start:.1f} s; wrote:")
    for path in written:
        print(f"  {path}")
    return written


if __name__ == "__main__":
    main()
