"""Forward+backward time of every normalization map of sparsemax.py, relative to torch.softmax.

For each shape (rows = batch*heads, cols = patterns) and map, times y = f(x); y.backward(g) (median of
--repeats runs after --warmup runs, same input and upstream gradient for every map) and prints a
markdown table of ratios to torch.softmax measured in the same process, plus the ``entmax`` package's
counterpart where one exists (sparsemax, entmax15, entmax_bisect, normmax_bisect, budget_bisect).

    python bench/bench_maps.py                 # full run, shapes 4096x1024 and 2048x64
    python bench/bench_maps.py --quick         # small smoke run
Results go to --out_dir (default results/bench_maps) as bench_maps.csv / .json / .md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from functools import partial
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sparsemax as S  # noqa: E402

try:
    import entmax as E
except ImportError:  # the package is optional for this benchmark
    E = None


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
    p.add_argument("--out_dir", default=None, help="default results/bench_maps (--quick: results/quick/bench_maps)")
    args = p.parse_args(argv)
    preset = dict(shapes=["256x128", "128x16"], repeats=2, warmup=1) if args.quick else \
        dict(shapes=["4096x1024", "2048x64"], repeats=7, warmup=2)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error(f"--repeats must be >= 1, --warmup >= 0 and --threads >= 1 (got {args.repeats}, {args.warmup}, "
                f"{args.threads})")
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
    args.out_dir = args.out_dir or os.path.join(results, "quick" if args.quick else "", "bench_maps")
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


def main(argv=None) -> list[dict]:
    global CLOCK
    args = parse_args(argv)
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    S.CPU_KERNELS = S._K is not None and not args.torch_path
    dtype = getattr(torch, args.dtype)
    impl = "numba CPU kernels (sparsemax_kernels.py)" if S.CPU_KERNELS else "torch solvers"
    print(f"config: {vars(args)}; torch {torch.__version__}; entmax {getattr(E, '__version__', None)}; ours = {impl}")
    rows_out = []
    for shape in args.shapes:
        r, c = (int(v) for v in shape.lower().split("x"))
        x = args.scale * torch.randn(r, c, dtype=dtype)
        g = torch.randn(r, c, dtype=dtype)
        base = lambda z: torch.softmax(z, -1)  # noqa: E731
        for name, ours, pkg in candidates(args, r, c, dtype):
            t_ours, t_soft, q_ours = paired(ours, base, x, g, args.repeats, args.warmup)
            if pkg is not None:
                t_pkg, _, q_pkg = paired(pkg, base, x, g, args.repeats, args.warmup)
            else:
                t_pkg = q_pkg = float("nan")
            row = dict(shape=shape, map=name, softmax_ms=t_soft * 1e3, ours_ms=t_ours * 1e3,
                       entmax_pkg_ms=t_pkg * 1e3, ours_vs_softmax=q_ours, pkg_vs_softmax=q_pkg)
            rows_out.append(row)
            print(f"[{shape}] {name:32s} ours {q_ours:7.2f}x softmax   entmax pkg {q_pkg:7.2f}x   "
                  f"(softmax {t_soft * 1e3:.3f} ms)", flush=True)
    table = markdown(rows_out, args)
    print("\n" + table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench_maps.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows_out[0]))
        w.writeheader()
        w.writerows(rows_out)
    with open(os.path.join(args.out_dir, "bench_maps.json"), "w") as fh:
        json.dump(dict(config=vars(args), results=rows_out), fh, indent=1)
    with open(os.path.join(args.out_dir, "bench_maps.md"), "w") as fh:
        fh.write(table + "\n")
    print(f"wrote {args.out_dir}/bench_maps.{{csv,json,md}}")
    return rows_out


def markdown(rows: list[dict], args) -> str:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    maps = list(dict.fromkeys(r["map"] for r in rows))
    head = "| map | " + " | ".join(f"ours / softmax ({s}) | entmax pkg / softmax ({s})" for s in shapes) + " |"
    sep = "|---|" + "---|---|" * len(shapes)
    impl = "torch solvers (--torch_path)" if args.torch_path else "numba CPU kernels"
    lines = [f"fwd+bwd {args.clock} time relative to torch.softmax, {args.dtype}, {args.threads} thread(s), median of "
             f"{args.repeats} paired ratios (each map alternates with torch.softmax); ours = {impl}", "", head, sep]
    for m in maps:
        cells = []
        for s in shapes:
            r = next((r for r in rows if r["map"] == m and r["shape"] == s), None)
            if r is None:
                cells += ["-", "-"]
            else:
                pk = "-" if r["pkg_vs_softmax"] != r["pkg_vs_softmax"] else f"{r['pkg_vs_softmax']:.2f}x"
                cells += [f"{r['ours_vs_softmax']:.2f}x", pk]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
