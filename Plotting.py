"""Regenerate the theory figures of sparse / structured modern Hopfield networks.

Every curve runs the Hopfield update of ``layers.retrieve``

    q  <-  X^T y_Omega(theta),   theta = beta X q,

with y_Omega in {softmax, sparsemax, 1.5-entmax, 2-normmax, 2-subsets} applied to beta * scores
(never to scores that were normalized first: that turns sparsemax into a linear memory).

Figures (PNG + the numbers behind each as CSV, file prefix in brackets):

1. [fig1_capacity]   MNIST memory capacity: success rate vs number of stored patterns N (5 .. 60,000),
                     queries = stored images with the bottom 14 or 18 of 28 rows masked, one update;
                     one panel per beta and one for Hu et al.'s setting (below).
                     [fig1_capacity_table] each map's capacity: the largest N of the grid whose success
                     (and that of every smaller N) is >= ``--capacity_level`` (0.9).
2. [fig2_noise]      MNIST noise robustness: success rate vs pixel-noise standard deviation sigma,
                     ``noise_n`` stored patterns, one update, same panels.
3. [fig3_convergence] MNIST retrieval error vs update steps and fraction of queries retrieved exactly
                     (Santos et al. 2024: exact retrieval with sparse maps, never with softmax).
4. [fig4_margin]     Exact retrieval and the margin: fraction of stored patterns that are fixed points vs
                     beta * Delta_i for alpha-entmax (margin 1/(alpha-1)) and alpha-normmax (margin 1).
5. [fig5_basins]     Basins of attraction of a few 2D patterns (Santos et al. 2024), two betas.
6. [fig6_sparsity, fig6_energy] Mean support size of y vs beta; Hopfield-Fenchel-Young energy
                     (``layers.energy``) along update trajectories, never increasing.

MNIST preprocessing (fixed-beta panels, figures 3, 4, 6): each image is centered by the mean training
image and scaled to unit L2 norm, so every stored pattern lies on the unit sphere (every pattern can be
a fixed point and Delta_i = 1 - max_{j != i} <x_i, x_j>).  Queries go through the same map after
corruption: masked pixels are set to the mean image (0 after centering); noise is N(0, sigma^2) per
pixel on the [0, 1] image (not clipped).

Hu et al. 2023 setting (panel ``hu2023``, their code's capacity and noise figures): raw pixels in [0, 1]
are the patterns, masked pixels are 0, noisy queries are clamp(|x + sigma eps|, 0, 1), and

    theta = 1000 s / sum_j s_j,   s = X q,

i.e. an effective inverse temperature beta_eff = 1000 / sum_j s_j that shrinks like 1/N (recorded as
``beta_eff``).  Their code normalized this way for softmax; its sparsemax got s / sum_j s_j, on which
sparsemax is the identity (a linear memory); here every map gets the same theta.

Success (figures 1, 2).  Maps that retrieve one pattern (softmax, sparsemax, 1.5-entmax, 2-normmax):
the cosine distance between the retrieved q and the target is <= ``--threshold`` (0.2, as Hu et al.'s
20/100).  k-subsets retrieves an association of k patterns (Santos et al. 2024): success iff the target
is one of the k patterns of largest weight and q lies within ``--threshold`` of their mean.  Beside
each rate the CSV holds what theory ties together after one update (target = pattern i for query i):
``frac_hit`` (target among the k largest scores), ``frac_past_margin`` (theta_(k) - theta_(k+1) >= m,
the map's margin: 1 for sparsemax, 2-normmax, 2-subsets; 2 for 1.5-entmax; none for softmax),
``frac_exact`` (y uniform on exactly k patterns: one-hot for k = 1), ``frac_exact_hit`` (both).
Theory: exact iff past the margin, and exact + hit implies success.

    python3 Plotting.py                  # every figure into imgs/ (the committed figures)
    python3 Plotting.py --report         # the README's capacity table, from imgs/fig1_capacity_table.csv
    python3 Plotting.py --quick --figures 1 4   # smoke run into results/smoke/ (gitignored)
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
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
import sparsemax  # noqa: E402
import training  # noqa: E402
from datasets.mnist import MNIST_SIZES  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent
FULL_OUT_DIR = "imgs"  # committed figures: written only by the full run the README cites
SMOKE_OUT_DIR = "results/smoke"  # --quick default (gitignored)
MNIST_TRAIN = MNIST_SIZES["train"]
IMAGE_ROWS = 28

MODES = ("softmax", "sparsemax", "entmax", "normmax", "k_subsets")
MODE_PARAMS = {"softmax": {}, "sparsemax": {}, "entmax": {}, "normmax": {"alpha": 2.0}, "k_subsets": {"k": 2}}
MODE_K = {mode: MODE_PARAMS[mode].get("k", 1) for mode in MODES}  # patterns per retrieved association
# y is uniform on the k best patterns iff theta_(k) - theta_(k+1) >= margin (softmax: never)
MODE_MARGIN = {"softmax": None, "sparsemax": 1.0, "entmax": 2.0, "normmax": 1.0, "k_subsets": 1.0}
MODE_LABELS = {"softmax": "softmax", "sparsemax": "sparsemax", "entmax": "1.5-entmax",
               "normmax": "2-normmax", "k_subsets": "2-subsets"}
MODE_COLORS = {"softmax": "tab:blue", "sparsemax": "tab:orange", "entmax": "tab:green",
               "normmax": "tab:red", "k_subsets": "tab:purple"}
MODE_STYLES = {"softmax": ("o", "-"), "sparsemax": ("s", "--"), "entmax": ("^", "-."), "normmax": ("v", ":"),
               "k_subsets": ("D", "-")}  # (marker, line style): overlapping curves stay visible
FIGURES = ("1", "2", "3", "4", "5", "6")
HU = "hu2023"  # setting name of Hu et al.'s normalized scores
HU_SCALE = 1000.0  # theta = HU_SCALE * s / sum(s)

# Figure 4: (family, mode, alpha, margin) with margin = 1/(alpha-1) for entmax, 1 for normmax.
MARGIN_MAPS = (("entmax", "entmax_alpha", 1.25, 4.0), ("entmax", "entmax_alpha", 1.5, 2.0),
               ("entmax", "entmax_alpha", 2.0, 1.0), ("normmax", "normmax", 2.0, 1.0),
               ("normmax", "normmax", 5.0, 1.0))


# --------------------------------------------------------------------------------------------------
# Settings and argument checks
# --------------------------------------------------------------------------------------------------
FULL = dict(
    capacity_ns=[5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 60000], runs=3,
    max_queries=500, mask_rows=[14, 18], noise_n=1000, sigmas=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5],
    conv_n=1000, conv_queries=500, conv_steps=10, margin_n=300, margin_betas=48,
    basin_grid=161, basin_steps=60, basin_trajectories=6, sparsity_n=1000, sparsity_queries=200,
    sparsity_betas=25, energy_queries=12, energy_steps=25)
QUICK = dict(
    capacity_ns=[5, 50, 500, 2000], runs=2, max_queries=100, mask_rows=[14, 18], noise_n=200,
    sigmas=[0.0, 0.5, 1.5], conv_n=100, conv_queries=60, conv_steps=5, margin_n=60, margin_betas=24,
    basin_grid=31, basin_steps=30, basin_trajectories=3, sparsity_n=200, sparsity_queries=32,
    sparsity_betas=10, energy_queries=6, energy_steps=12)
N_TRAJECTORY_STARTS = 6  # fixed starting points of figure 5
# The figures that read each figure-specific flag (tests/test_plotting.py checks it against the code): a flag
# given for a --figures subset that does not read it is refused, not ignored.
FIGURE_FLAGS = {
    "modes": "12356", "seed": "12346", "betas": "12", "no_hu": "12", "runs": "12", "steps": "12",
    "threshold": "12", "max_queries": "12", "capacity_ns": "1", "capacity_level": "1", "mask_rows": "1",
    "noise_n": "2", "sigmas": "2", "conv_beta": "3", "conv_sigma": "3", "conv_n": "3", "conv_queries": "3",
    "conv_steps": "3", "margin_n": "4", "margin_betas": "4", "basin_betas": "5", "basin_grid": "5",
    "basin_steps": "5", "basin_trajectories": "5", "energy_beta": "6", "energy_queries": "6", "energy_steps": "6",
    "sparsity_n": "6", "sparsity_queries": "6", "sparsity_betas": "6"}

# flag: (lowest, highest) allowed value of each element (None: unbounded), checked before any work
INT_RANGES = {
    "capacity_ns": (3, MNIST_TRAIN), "runs": (1, None), "max_queries": (1, None), "mask_rows": (1, IMAGE_ROWS - 1),
    "noise_n": (3, MNIST_TRAIN), "conv_n": (1, MNIST_TRAIN), "conv_queries": (1, None), "conv_steps": (1, None),
    "margin_n": (2, MNIST_TRAIN), "margin_betas": (2, None), "basin_grid": (2, None), "basin_steps": (1, None),
    "basin_trajectories": (1, N_TRAJECTORY_STARTS), "sparsity_n": (1, MNIST_TRAIN), "sparsity_queries": (1, None),
    "sparsity_betas": (2, None), "energy_queries": (1, None), "energy_steps": (1, None), "steps": (1, None),
    "threads": (0, None), "seed": (0, None)}
POSITIVE_FLOATS = ("betas", "conv_beta", "basin_betas", "energy_beta")  # > 0 and finite
FLOAT_RANGES = {"sigmas": (0.0, math.inf), "conv_sigma": (0.0, math.inf), "threshold": (0.0, 2.0),
                "capacity_level": (0.0, 1.0)}  # closed intervals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=None,
                        help=f"where PNG/CSV/JSON go (default: {FULL_OUT_DIR}/, with --quick {SMOKE_OUT_DIR}/)")
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES,
                        help="which figures to make (default: all)")
    parser.add_argument("--quick", action="store_true", help="small settings for tests/smoke runs")
    parser.add_argument("--report", action="store_true",
                        help="print the capacity table of <out_dir>/fig1_capacity_table.csv as markdown and exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None,
                        help="directory of the MNIST IDX files (default: the embedded datasets/data; sha256-checked)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--betas", nargs="+", type=float, default=[3.0, 10.0, 100.0],
                        help="inverse temperatures of the MNIST capacity / noise figures (one panel each)")
    parser.add_argument("--no_hu", action="store_true",
                        help=f"leave out the panel of Hu et al.'s setting ({HU}: theta = 1000 s / sum(s))")
    parser.add_argument("--threshold", type=float, default=0.2,
                        help="success iff cosine distance(retrieved, target) <= threshold, in [0, 2]")
    parser.add_argument("--capacity_level", type=float, default=0.9,
                        help="capacity = largest N with success >= this level (and at every smaller N)")
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
    if args.report:
        training.refuse_flags_besides(parser, args, "report", ("out_dir", "quick"),
                                      "prints the capacity table of <out_dir>")
    refuse_flags_of_other_figures(parser, args)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out_dir is None:
        args.out_dir = str(REPO_DIR / (SMOKE_OUT_DIR if args.quick else FULL_OUT_DIR))
    check_args(parser, args)
    if args.data_dir is not None:
        try:  # a missing or corrupt file fails here, named, before any work
            datasets.load_mnist("train", args.data_dir)
        except (OSError, ValueError, datasets.DataIntegrityError) as error:
            parser.error(f"argument --data_dir: {error}")
    return args


def refuse_flags_of_other_figures(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A figure-specific flag given (not at its default) while no figure of --figures reads it: exit 2."""
    for name, figures in FIGURE_FLAGS.items():
        value = getattr(args, name)
        if value not in (None, parser.get_default(name)) and not set(figures) & set(args.figures):
            parser.error(f"argument --{name}: {value!r} would be ignored: only --figures {' '.join(figures)} "
                         f"read it (got --figures {' '.join(args.figures)})")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse out-of-range values before any work (argparse error naming flag, value and range: exit 2)."""
    def refuse(name: str, value, allowed: str) -> None:
        parser.error(f"argument --{name}: {value!r} is out of range; allowed: {allowed}")

    def values(name: str) -> list:
        value = getattr(args, name)
        return value if isinstance(value, list) else [value]

    for name, (lo, hi) in INT_RANGES.items():
        for v in values(name):
            if v < lo or (hi is not None and v > hi):
                refuse(name, v, f"integers >= {lo}" if hi is None else f"integers in [{lo}, {hi}]")
    for name in POSITIVE_FLOATS:
        for v in values(name):
            if not (math.isfinite(v) and v > 0):
                refuse(name, v, "finite numbers > 0")
    for name, (lo, hi) in FLOAT_RANGES.items():
        for v in values(name):
            if not (lo <= v <= hi) or math.isnan(v):
                refuse(name, v, f"numbers in [{lo:g}, {hi:g}]")
    for queries, stored in (("conv_queries", "conv_n"), ("sparsity_queries", "sparsity_n")):
        if getattr(args, queries) > getattr(args, stored):  # the queries are stored patterns, none drawn twice
            refuse(queries, getattr(args, queries), f"integers in [1, {getattr(args, stored)}] (--{stored})")
    if args.runs * args.noise_n > MNIST_TRAIN:
        refuse("noise_n", args.noise_n, f"--runs x --noise_n <= {MNIST_TRAIN} (disjoint MNIST subsets), "
                                        f"i.e. <= {MNIST_TRAIN // args.runs} with --runs {args.runs}")


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given (logged configs)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_DIR)) if resolved.is_relative_to(REPO_DIR) else str(path)


def git_commit() -> dict:
    """HEAD commit of the repository and whether tracked files differ from it."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO_DIR, capture_output=True, text=True).stdout
    try:
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return {"git_commit": git("rev-parse", "HEAD").strip() or None, "git_dirty": bool(changed),
                "git_changed_files": [f for f in changed if f.endswith(".py")]}  # code that differed from HEAD
    except OSError:  # no git executable
        return {"git_commit": None, "git_dirty": None, "git_changed_files": None}


def panel_settings(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """(name, beta) of each panel of figures 1 and 2: the fixed betas, then Hu et al.'s (beta None)."""
    panels: list[tuple[str, float | None]] = [(f"beta={b:g}", b) for b in args.betas]
    return panels if args.no_hu else panels + [(HU, None)]


# --------------------------------------------------------------------------------------------------
# Data: MNIST patterns and corrupted queries
# --------------------------------------------------------------------------------------------------
def mnist_raw(split: str = "train", data_dir: str | None = None) -> tuple[Tensor, Tensor]:
    """Flattened MNIST images (N, 784) in [0, 1] and the mean image (784,)."""
    images, _ = datasets.load_mnist(split, data_dir)
    raw = torch.from_numpy(np.array(images, dtype=np.float32)).reshape(len(images), -1)
    return raw, raw.mean(0)


def unit_rows(x: Tensor) -> Tensor:
    """x / ||x|| row-wise (a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def to_pattern(raw: Tensor, mean: Tensor) -> Tensor:
    """x = (image - mean) / ||image - mean||: centered, unit L2 norm."""
    return unit_rows(raw - mean)


def mask_bottom_rows(images: Tensor, mask_rows: int) -> Tensor:
    """Copy of flattened 28 x 28 images with the bottom ``mask_rows`` image rows set to 0."""
    out = images.reshape(-1, IMAGE_ROWS, images.shape[-1] // IMAGE_ROWS).clone()
    out[:, IMAGE_ROWS - mask_rows:, :] = 0.0
    return out.reshape(images.shape)


def masked_query(raw: Tensor, mean: Tensor, mask_rows: int = 14) -> Tensor:
    """Query with the bottom ``mask_rows`` image rows replaced by the mean image, then normalized."""
    return unit_rows(mask_bottom_rows(raw - mean, mask_rows))


def noisy_query(raw: Tensor, mean: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Query = pattern map of image + N(0, sigma^2) pixel noise (sigma = standard deviation)."""
    noise = torch.randn(raw.shape, generator=generator, dtype=raw.dtype)
    return to_pattern(raw + sigma * noise, mean)


def hu_noisy_query(raw: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Hu et al.'s noisy query on raw pixels: clamp(|image + N(0, sigma^2)|, 0, 1)."""
    noise = torch.randn(raw.shape, generator=generator, dtype=raw.dtype)
    return (raw + sigma * noise).abs().clamp(0.0, 1.0)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - <a, b> / (||a|| ||b||), row-wise."""
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def run_subsets(n_images: int, runs: int, size: int, seed: int) -> list[Tensor]:
    """Disjoint random index sets (one per run) of ``size`` images each."""
    if runs * size > n_images:
        raise ValueError(f"{runs} runs x {size} patterns exceed the {n_images} available images")
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    return [perm[r * size:(r + 1) * size] for r in range(runs)]


def run_samples(n_images: int, runs: int, size: int, seed: int) -> list[Tensor]:
    """Independent random index sets (one per run, seed + run) of ``size`` images: runs overlap once
    runs x size > n_images (with size = n_images every run stores all images, in its own order)."""
    return [torch.randperm(n_images, generator=torch.Generator().manual_seed(seed + r))[:size] for r in range(runs)]


def support_size(y: Tensor) -> Tensor:
    """Number of exactly non-zero weights per row."""
    return (y > 0).sum(-1)


# --------------------------------------------------------------------------------------------------
# Figures 1 and 2: one update, scored per map
# --------------------------------------------------------------------------------------------------
def scaled_scores(queries: Tensor, patterns: Tensor, beta: float | None) -> tuple[Tensor, Tensor]:
    """theta = b X q per query with b = beta, or Hu et al.'s b = 1000 / sum_j <x_j, q> when beta is None.

    Returns (theta (n_q, N), b (n_q, 1))."""
    scores = queries @ patterns.T
    if beta is None:  # a query with no ink left (sum s = 0) gets theta = 0 (uniform y) and b = NaN
        total = scores.sum(-1, keepdim=True)
        b = torch.where(total > 0, HU_SCALE / total, float("nan"))
        return torch.nan_to_num(b, nan=0.0) * scores, b
    return beta * scores, torch.full((len(scores), 1), beta, dtype=scores.dtype)


def first_step_stats(top: torch.return_types.topk, y: Tensor, k: int, margin: float | None) -> dict[str, float]:
    """Fractions over queries (the target of query i is pattern i) of: hit (target among the k largest
    theta), past_margin (theta_(k) - theta_(k+1) >= margin; NaN without a margin), exact (y uniform on
    exactly k patterns, i.e. support size k) and exact_hit (both).  ``top``: theta.topk(>= k + 1)."""
    hit = (top.indices[:, :k] == torch.arange(len(y))[:, None]).any(-1)
    exact = support_size(y) == k
    past = float("nan") if margin is None else \
        ((top.values[:, k - 1] - top.values[:, k]) >= margin).double().mean().item()
    return dict(frac_hit=hit.double().mean().item(), frac_past_margin=past,
                frac_exact=exact.double().mean().item(), frac_exact_hit=(exact & hit).double().mean().item())


def retrieval_success(out: Tensor, y: Tensor, patterns: Tensor, targets: Tensor, k: int,
                      threshold: float) -> Tensor:
    """Per query. k = 1: d_cos(q, x_target) <= threshold.  k > 1 (k-subsets retrieves an association
    of k patterns): the target is one of the k patterns of largest weight y and d_cos(q, their mean)
    <= threshold."""
    if k == 1:
        return cosine_distance(out, patterns[targets]) <= threshold
    top = y.topk(k, dim=-1).indices
    hit = (top == targets[:, None]).any(-1)
    return hit & (cosine_distance(out, patterns[top].mean(1)) <= threshold)


def criterion(mode: str) -> str:
    """Name of what a map's success measures: the target pattern, or a k-set containing it."""
    return "pattern" if MODE_K[mode] == 1 else f"{MODE_K[mode]}-set"


def evaluate_maps(queries: Tensor, patterns: Tensor, beta: float | None, modes: list[str], steps: int,
                  threshold: float) -> list[dict]:
    """One row per map: success after ``steps`` updates q <- X^T y(theta(q)) (``layers.retrieve``'s update,
    theta from ``scaled_scores``), the first update's ``first_step_stats`` and the mean b (beta_eff; Hu
    et al.'s setting: over queries with a nonzero score sum).
    Query i's target is pattern i; k-subsets is scored on the association of its last update."""
    theta, b = scaled_scores(queries, patterns, beta)
    top = theta.topk(max(MODE_K[m] for m in modes) + 1, dim=-1)  # shared by every map's statistics
    targets = torch.arange(len(queries))
    rows = []
    for mode in modes:
        y_map = sparsemax.get_map(mode, **MODE_PARAMS[mode])
        y = y_map(theta)
        stats = first_step_stats(top, y, MODE_K[mode], MODE_MARGIN[mode])
        out = y @ patterns
        for _ in range(steps - 1):
            y = y_map(scaled_scores(out, patterns, beta)[0])
            out = y @ patterns
        ok = retrieval_success(out, y, patterns, targets, MODE_K[mode], threshold)
        rows.append(dict(mode=mode, criterion=criterion(mode), success=ok.double().mean().item(), **stats,
                         beta_eff=b.nanmean().item()))
    return rows


def capacity_experiment(args: argparse.Namespace, raw: Tensor, mean: Tensor) -> pd.DataFrame:
    """Success per (setting, masked rows, mode, N stored, run); queries: the first ``max_queries``
    stored images with their bottom rows masked.  Run r stores the first N of its own random order of
    the 60,000 MNIST-train images (runs overlap for large N; at N = 60,000 only the queries differ)."""
    rows = []
    orders = run_samples(len(raw), args.runs, max(args.capacity_ns), args.seed)
    tasks = [(r, n) for r in range(args.runs) for n in args.capacity_ns]
    for run, n in tqdm(tasks, desc="fig1 capacity", leave=False):
        stored_raw = raw[orders[run][:n]]
        n_q = min(n, args.max_queries)
        for setting, beta in panel_settings(args):
            hu = beta is None
            patterns = stored_raw if hu else to_pattern(stored_raw, mean)
            for mask_rows in args.mask_rows:
                queries = mask_bottom_rows(stored_raw[:n_q], mask_rows) if hu else \
                    masked_query(stored_raw[:n_q], mean, mask_rows)
                for row in evaluate_maps(queries, patterns, beta, args.modes, args.steps, args.threshold):
                    rows.append(dict(setting=setting, beta=float("nan") if hu else beta, mask_rows=mask_rows,
                                     n_stored=n, run=run, n_queries=n_q, **row))
    return pd.DataFrame(rows)


def noise_experiment(args: argparse.Namespace, raw: Tensor, mean: Tensor) -> pd.DataFrame:
    """Success per (setting, mode, sigma, run) with ``noise_n`` stored patterns (disjoint sets per run);
    every setting sees the same noise draw."""
    rows = []
    subsets = run_subsets(len(raw), args.runs, args.noise_n, args.seed + 1)
    tasks = [(r, s) for r in range(args.runs) for s in args.sigmas]
    for run, sigma in tqdm(tasks, desc="fig2 noise", leave=False):
        stored_raw = raw[subsets[run]]
        n_q = min(args.noise_n, args.max_queries)
        for setting, beta in panel_settings(args):
            hu = beta is None
            generator = torch.Generator().manual_seed(args.seed * 1000 + run)
            patterns = stored_raw if hu else to_pattern(stored_raw, mean)
            queries = hu_noisy_query(stored_raw[:n_q], sigma, generator) if hu else \
                noisy_query(stored_raw[:n_q], mean, sigma, generator)
            for row in evaluate_maps(queries, patterns, beta, args.modes, args.steps, args.threshold):
                rows.append(dict(setting=setting, beta=float("nan") if hu else beta, sigma=sigma, run=run,
                                 n_queries=n_q, **row))
    return pd.DataFrame(rows)


def capacity_table(df: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per (setting, masked rows, mode): capacity_n = the largest N of the grid whose mean success over
    runs is >= level there and at every smaller N (0: none); first_fail_n = the smallest N below the
    level (NaN: never below on the grid, so the capacity is at least the largest N)."""
    rows = []
    for (setting, mask_rows, mode), d in df.groupby(["setting", "mask_rows", "mode"], sort=False):
        curve = d.groupby("n_stored").success.mean().sort_index()
        failing = curve.index[curve.to_numpy() < level - 1e-9]  # 1e-9: rates like 450/500 = 0.9 pass
        first_fail = failing.min() if len(failing) else float("nan")
        passing = curve.index[curve.index < first_fail] if len(failing) else curve.index
        rows.append(dict(setting=setting, mask_rows=mask_rows, mode=mode, criterion=criterion(mode), level=level,
                         capacity_n=int(passing.max()) if len(passing) else 0, first_fail_n=first_fail,
                         max_n=int(curve.index.max()), success_at_max_n=curve.iloc[-1]))
    return pd.DataFrame(rows)


def capacity_cell(row: pd.Series) -> str:
    """Table cell: the capacity, '>= N' when never below the level, '< N' when below from the start."""
    if math.isnan(row.first_fail_n):
        return f">= {row.capacity_n:,}"
    return f"< {int(row.first_fail_n):,}" if row.capacity_n == 0 else f"{row.capacity_n:,}"


def report_table(table: pd.DataFrame) -> str:
    """Markdown capacity table: one row per map, one column per (masked rows, setting)."""
    settings = list(dict.fromkeys(table.setting))
    columns = sorted(dict.fromkeys(zip(table.mask_rows, table.setting)), key=lambda c: (c[0], settings.index(c[1])))
    header = ["map"] + [f"{m}/{IMAGE_ROWS} rows masked, {'Hu et al.' if s == HU else s.replace('beta', 'β')}"
                        for m, s in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in dict.fromkeys(table["mode"]):
        cells = [capacity_cell(table[(table["mode"] == mode) & (table.mask_rows == m) & (table.setting == s)].iloc[0])
                 for m, s in columns]
        lines.append("| " + " | ".join([MODE_LABELS.get(mode, mode)] + cells) + " |")
    return "\n".join(lines)


def line_style(mode: str) -> dict:
    """Matplotlib keywords of a mode's curve (same color/marker/line style in every figure)."""
    marker, style = MODE_STYLES[mode]
    return dict(marker=marker, ls=style, ms=4, lw=1.6, color=MODE_COLORS[mode], label=MODE_LABELS[mode],
                markerfacecolor="none" if mode != "softmax" else MODE_COLORS[mode])


def panel_title(setting: str, d: pd.DataFrame) -> str:
    """Fixed beta, or Hu et al.'s setting with the range of its effective beta."""
    if setting != HU:
        return f"$\\beta$ = {d.beta.iloc[0]:g} (centered, unit-norm patterns)"
    lo, hi = d.beta_eff.min(), d.beta_eff.max()
    return f"Hu et al. 2023 setting: raw pixels, $\\theta$ = 1000 s / $\\Sigma_j s_j$\n" \
           f"($\\beta_{{eff}}$ = 1000 / $\\Sigma_j s_j$ from {lo:.2g} to {hi:.2g})"


def success_caption(modes: list[str], threshold: float) -> str:
    """What success means per map (figure caption)."""
    single = ", ".join(MODE_LABELS[m] for m in modes if MODE_K[m] == 1)
    parts = [f"{single}: cosine distance(q, target) $\\leq$ {threshold:g}"] if single else []
    parts += [f"{MODE_LABELS[m]}: target among the {MODE_K[m]} patterns of largest weight and cosine "
              f"distance(q, their mean) $\\leq$ {threshold:g}" for m in modes if MODE_K[m] > 1]
    return "success = " + "; ".join(parts)


def plot_success_panels(df: pd.DataFrame, x: str, xlabel: str, path: Path, modes: list[str], suptitle: str,
                        threshold: float, row: str | None = None, logx: bool = False,
                        level: float | None = None) -> None:
    """Panels (rows: values of ``row``; columns: settings): mean +- std over runs of the success rate."""
    settings = list(dict.fromkeys(df.setting))
    row_values = sorted(df[row].unique()) if row else [None]
    fig, axes = plt.subplots(len(row_values), len(settings), figsize=(4.4 * len(settings), 3.5 * len(row_values) + 0.9),
                             squeeze=False, sharey=True)
    for i, value in enumerate(row_values):
        for j, setting in enumerate(settings):
            ax = axes[i, j]
            d = df[(df.setting == setting) & ((df[row] == value) if row else True)]
            for mode in modes:
                stats = d[d["mode"] == mode].groupby(x).success.agg(["mean", "std"])
                std = stats["std"].fillna(0.0)
                ax.plot(stats.index, stats["mean"], **line_style(mode))
                ax.fill_between(stats.index, stats["mean"] - std, stats["mean"] + std, color=MODE_COLORS[mode],
                                alpha=0.2)
            if level is not None:
                ax.axhline(level, color="grey", ls=":", lw=1)
            ax.set_title(panel_title(setting, d), fontsize=9)
            ax.set_xlabel(xlabel)
            if logx:
                ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("success rate" if row is None else
                              f"success rate\n(bottom {value} of {IMAGE_ROWS} rows masked)")
    axes[0, -1].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"{suptitle}\n{success_caption(modes, threshold)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    n_q = args.conv_queries  # <= conv_n (check_args)
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
    n_q = args.sparsity_queries  # <= sparsity_n (check_args)
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
    provenance = git_commit()  # the code as the run starts
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    needs_mnist = set(args.figures) & {"1", "2", "3", "4", "6"}
    raw, mean = mnist_raw("train", args.data_dir) if needs_mnist else (None, None)
    timings = {}

    def timed(name: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"figure {name}: {timings[name]:.1f} s")

    def fig1():
        df = capacity_experiment(args, raw, mean)
        save(df, out_dir, "fig1_capacity", written)
        save(capacity_table(df, args.capacity_level), out_dir, "fig1_capacity_table", written)
        plot_success_panels(df, "n_stored", "number of stored MNIST patterns N", out_dir / "fig1_capacity.png",
                            args.modes, f"Memory capacity on MNIST (one update, {args.runs} runs; dotted: "
                            f"capacity level {args.capacity_level:g})", args.threshold, row="mask_rows",
                            logx=True, level=args.capacity_level)
        written.append(out_dir / "fig1_capacity.png")

    def fig2():
        df = noise_experiment(args, raw, mean)
        save(df, out_dir, "fig2_noise", written)
        plot_success_panels(df, "sigma", "noise standard deviation $\\sigma$ (pixels in [0, 1])",
                            out_dir / "fig2_noise.png", args.modes,
                            f"Noise robustness on MNIST, N = {args.noise_n} stored (one update, {args.runs} runs)",
                            args.threshold)
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

    start = time.perf_counter()
    makers = {"1": fig1, "2": fig2, "3": fig3, "4": fig4, "5": fig5, "6": fig6}
    for name in FIGURES:
        if name in args.figures:
            timed(name, makers[name])
    config_path = out_dir / "figures_config.json"  # timings of figures made by earlier runs are kept
    previous = json.loads(config_path.read_text()).get("timings_s", {}) if config_path.exists() else {}
    record = {**run_config(args), "wall_time_s": round(time.perf_counter() - start, 2),
              "timings_s": {**previous, **timings}, "threads_used": torch.get_num_threads(), **provenance}
    config_path.write_text(json.dumps(record, indent=2, default=str))
    written.append(config_path)
    return written


def run_config(args: argparse.Namespace) -> dict:
    """The run's settings as logged: paths repo-relative."""
    return {**vars(args), "out_dir": repo_relative(args.out_dir)}


def report_findings(out_dir: Path) -> list[str]:
    """The README's numbers besides the capacity table, read from the CSV/JSON files in ``out_dir``."""
    config = json.loads((out_dir / "figures_config.json").read_text())
    noise = pd.read_csv(out_dir / "fig2_noise.csv")
    conv = pd.read_csv(out_dir / "fig3_convergence.csv")
    margin = pd.read_csv(out_dir / "fig4_margin_summary.csv")
    energy = pd.read_csv(out_dir / "fig6_energy.csv")

    def per_map(values: pd.Series, fmt: str = ".2f") -> str:
        return ", ".join(f"{MODE_LABELS.get(m, m)} {v:{fmt}}" for m, v in values.items())

    lines = []
    top_sigma = noise.sigma.max()
    for setting, d in noise[noise.sigma == top_sigma].groupby("setting", sort=False):
        lines.append(f"fig2 ({setting}, N = {config['noise_n']}): success at sigma = {top_sigma:g}: "
                     + per_map(d.groupby("mode", sort=False).success.mean()))
    step1 = conv[conv.step == 1].set_index("mode")
    lines.append(f"fig3 (beta = {config['conv_beta']:g}): fraction retrieved exactly after one update: "
                 + per_map(step1.frac_exact))
    for m, d in margin.groupby("margin"):
        lines.append(f"fig4 margin {m:g}: largest beta*Delta not fixed {d.max_beta_delta_not_fixed.max():.4f}, "
                     f"smallest fixed {d.min_beta_delta_fixed.min():.4f}")
    increase = max(np.diff(g.sort_values("step").energy.to_numpy()).max() for _, g in energy.groupby(["mode", "query"]))
    lines.append(f"fig6: largest step-to-step energy change {increase:.2g}")
    timings = ", ".join(f"fig{k} {v:.0f} s" for k, v in config["timings_s"].items())
    lines.append(f"wall time {config['wall_time_s'] / 60:.1f} min with {config['threads_used']} threads ({timings}); "
                 f"commit {str(config['git_commit'])[:7]}{' + uncommitted changes' if config['git_dirty'] else ''}")
    return lines


def print_report(args: argparse.Namespace) -> str:
    """The README's capacity table and numbers, rebuilt from the files in <out_dir> (no computation)."""
    out_dir = Path(args.out_dir)
    path = out_dir / "fig1_capacity_table.csv"
    if not path.exists():
        raise SystemExit(f"{repo_relative(path)} not found: run `python3 Plotting.py` first")
    text = report_table(pd.read_csv(path)) + "\n\n" + "\n".join(f"- {line}" for line in report_findings(out_dir))
    print(text)
    return text


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.report:
        print_report(args)
        return []
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = run_config(args)
    print("config:", json.dumps(config, sort_keys=True, default=str))
    start = time.perf_counter()
    written = make_figures(args)
    print(f"done in {time.perf_counter() - start:.1f} s; wrote:")
    for path in written:
        print(f"  {repo_relative(path)}")
    return written


if __name__ == "__main__":
    main()
