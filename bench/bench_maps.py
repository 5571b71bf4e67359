"""Forward+backward time of every normalization map of sparsemax.py, relative to torch.softmax.

For each shape (rows = batch*heads, cols = patterns) and map, times y = f(x); y.backward(g) (median of
--repeats runs after --warmup runs, same input and upstream gradient for every map) and prints a
markdown table of ratios to torch.softmax measured in the same process, plus the ``entmax`` package's
counterpart where one exists (sparsemax, entmax15, entmax_bisect, normmax_bisect, budget_bisect), beside
each map's target.

    python3 bench/bench_maps.py            # shapes 4096x1024 and 2048x64; writes results/bench/bench_maps.{json,md}
    python3 bench/bench_maps.py --quick    # small smoke run; writes results/quick/bench/
    python3 bench/bench_maps.py --report   # the README block bench_maps, from results/bench/bench_maps.json
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

import sparsemax as S  # noqa: E402
import training  # noqa: E402
from bench.common import (committed_report as common_report, measured_at, provenance, report_block,  # noqa: E402
                          target_cell, write_result)

try:
    import entmax as E
except ImportError:  # the package is optional for this benchmark
    E = None

# ours / softmax at most this at every shape, by map name of the default setting (alpha-entmax: the pow-free
# alpha = 1.5 only; sequential k-subsets is timed on the narrow shape only, --seq_max_cols)
TARGETS = {"sparsemax": 2.0, "entmax15": 2.0, "entmax alpha=1.5 (tensor)": 6.0, "normmax alpha=2.0": 6.0,
           "k_subsets k=3": 3.0, "sequential_k_subsets k=3": 20.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="ROWSxCOLS list (default 4096x1024 2048x64)")
    p.add_argument("--repeats", type=int, default=None, help="default 7 (--quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (--quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (same for all maps)")
    p.add_argument("--scale", type=float, default=1.0, help="x = scale * randn")
    p.add_argument("--k", type=int, default=3, help="k of the SparseMAP maps")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.5, 1.25],
                   help="alphas of entmax_alpha (tensor alpha); 1.5 has a pow-free bracket, others use pow")
    p.add_argument("--normmax_alpha", type=float, default=2.0)
    p.add_argument("--seq_max_cols", type=int, default=64,
                   help="skip sequential_k_subsets for wider shapes (it is O(n k) sequential per oracle call)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--clock", choices=["process", "wall"], default="process",
                   help="process: CPU time of this process (robust on a shared machine with 1 thread); "
                        "wall: perf_counter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_path", action="store_true",
                   help="time sparsemax.py's torch solvers (its CUDA path) instead of the numba CPU kernels")
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, 2 repeats (explicit flags win)")
    p.add_argument("--out_dir", default=None, help="default results/bench (--quick: results/quick/bench)")
    p.add_argument("--report", action="store_true",
                   help="only write the README block bench_maps from results/bench/bench_maps.json")
    args = p.parse_args(argv)
    preset = dict(shapes=["256x128", "128x16"], repeats=2, warmup=1) if args.quick else \
        dict(shapes=["4096x1024", "2048x64"], repeats=7, warmup=2)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error(f"--repeats must be >= 1, --warmup >= 0 and --threads >= 1 (got {args.repeats}, {args.warmup}, "
                f"{args.threads})")
    args.out_dir = str(args.out_dir or REPO_DIR / "results" / ("quick/bench" if args.quick else "bench"))
    return args


CLOCK = time.process_time


def once(fn: Callable, x: torch.Tensor, g: torch.Tensor) -> float:
    """Seconds of one forward + backward."""
    xx = x.detach().requires_grad_(True)
    t0 = CLOCK()
    fn(xx).backward(g)
    return CLOCK() - t0


def paired(fn: Callable, base: Callable, x: torch.Tensor, g: torch.Tensor, repeats: int,
           warmup: int) -> tuple[float, float, float]:
    """Median time of fn, median time of base and median of the per-repeat ratios fn/base.

    fn and base alternate, so on a shared (noisy) machine both see the same load; the ratio is the
    median of paired ratios."""
    tf, tb = [], []
    for i in range(warmup + repeats):
        a, b = once(fn, x, g), once(base, x, g)
        if i >= warmup:
            tf.append(a)
            tb.append(b)
    ratios = sorted(a / b for a, b in zip(tf, tb))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(tf), med(tb), ratios[len(ratios) // 2]


def candidates(args, rows: int, cols: int, dtype) -> list[tuple[str, Callable, Callable | None]]:
    """(name, ours, entmax package counterpart or None)."""
    k, na = args.k, args.normmax_alpha
    out = [
        ("softmax (ours, mask-safe)", lambda z: S.softmax(z, -1), None),
        ("sparsemax", lambda z: S.sparsemax(z, -1), (lambda z: E.sparsemax(z, -1)) if E else None),
        ("entmax15", lambda z: S.entmax15(z, -1), (lambda z: E.entmax15(z, -1)) if E else None),
    ]
    for a in args.alpha:
        alpha_t = torch.full((rows, 1), a, dtype=dtype)
        out.append((f"entmax alpha={a} (tensor)", partial(S.entmax, alpha=alpha_t, dim=-1),
                    partial(E.entmax_bisect, alpha=alpha_t, dim=-1) if E else None))
    out += [
        (f"normmax alpha={na}", lambda z: S.normmax(z, na, -1),
         (lambda z: E.normmax_bisect(z, na, -1)) if E else None),
        (f"k_subsets k={k}", lambda z: S.k_subsets(z, k, -1, normalize=False),
         (lambda z: E.budget_bisect(z, k, -1)) if E else None),
    ]
    if cols <= args.seq_max_cols:
        out.append((f"sequential_k_subsets k={k}", lambda z: S.sequential_k_subsets(z, k, -1), None))
    return out


def main(argv=None) -> dict:
    global CLOCK
    args = parse_args(argv)
    if args.report:
        report_block("bench_maps", markdown)
        return {}
    start = time.perf_counter()
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    S.CPU_KERNELS = S._K is not None and not args.torch_path
    dtype = getattr(torch, args.dtype)
    config = training.log_config(args)
    implementation = "numba CPU kernels (sparsemax_kernels.py)" if S.CPU_KERNELS else "torch solvers"
    print(f"torch {torch.__version__}; entmax {getattr(E, '__version__', None)}; ours = {implementation}")
    rows = []
    for shape in args.shapes:
        r, c = (int(v) for v in shape.lower().split("x"))
        x = args.scale * torch.randn(r, c, dtype=dtype)
        g = torch.randn(r, c, dtype=dtype)
        base = lambda z: torch.softmax(z, -1)  # noqa: E731
        for name, ours, pkg in candidates(args, r, c, dtype):
            t_ours, t_soft, q_ours = paired(ours, base, x, g, args.repeats, args.warmup)
            t_pkg, _, q_pkg = paired(pkg, base, x, g, args.repeats, args.warmup) if pkg else (None, None, None)
            rows.append(dict(shape=shape, map=name, softmax_ms=t_soft * 1e3, ours_ms=t_ours * 1e3,
                             entmax_pkg_ms=None if t_pkg is None else t_pkg * 1e3, ours_vs_softmax=q_ours,
                             pkg_vs_softmax=q_pkg))
            print(f"[{shape}] {name:32s} ours {q_ours:7.2f}x softmax   entmax pkg {_ratio(q_pkg):>7s} softmax   "
                  f"(softmax {t_soft * 1e3:.3f} ms)", flush=True)
    result = {"config": config, "ours": implementation, "torch": torch.__version__, "entmax": getattr(E, "__version__", None),
              "rows": rows, **provenance(start)}
    write_result(result, args.out_dir, "bench_maps", markdown)
    return result


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(result: dict) -> str:
    """The ratio table of a bench_maps result (a map's target is met when ours / softmax is within it at every
    shape), the entmax package's range, and where it was measured."""
    cfg, rows = result["config"], result["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by = {(r["map"], r["shape"]): r for r in rows}
    lines = [f"fwd+bwd {cfg['clock']} time relative to torch.softmax on the same tensor (batch*heads x patterns), "
             f"{cfg['dtype']}, {cfg['threads']} thread(s), median of {cfg['repeats']} paired ratios (each map "
             f"alternates with torch.softmax); ours = {result['ours']}", "",
             "| map | " + " | ".join(f"ours / softmax ({s}) | entmax pkg / softmax ({s})" for s in shapes)
             + " | target (ours / softmax) |", "|---|" + "---|---|" * len(shapes) + "---|"]
    for name in dict.fromkeys(r["map"] for r in rows):
        cells = [_ratio(by[name, s][key]) if (name, s) in by else "-"
                 for s in shapes for key in ("ours_vs_softmax", "pkg_vs_softmax")]
        worst = max(by[name, s]["ours_vs_softmax"] for s in shapes if (name, s) in by)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {target_cell(worst, TARGETS.get(name), False)} |")
    pkg = [r for r in rows if r["pkg_vs_softmax"] is not None]
    if pkg:
        faster = sum(r["ours_vs_softmax"] < r["pkg_vs_softmax"] for r in pkg)
        lines += ["", f"The entmax package's counterparts take {min(r['pkg_vs_softmax'] for r in pkg):.0f}-"
                  f"{max(r['pkg_vs_softmax'] for r in pkg):.0f}x softmax (version {result['entmax']}); ours is "
                  f"faster in {faster} of the {len(pkg)} (map, shape) pairs that have one."]
    return "\n".join(lines + ["", measured_at(result)])


def committed_report() -> str:
    """The README block ``bench_maps``: the table of the committed full run."""
    return common_report("bench_maps", markdown)


if __name__ == "__main__":
    main()
