"""Benchmark: Anderson vs Picard and even/odd vs synchronous updates, iterations and wall time to the
same relative residual, all in one process; prints ratios against the Picard / synchronous baseline.

1. Synthetic DEQ z = tanh(W z + U x) (``--dim``, spectral norm ``--norm``): Picard vs Anderson.
2. MNIST Hopfield nets (CHN and HAM, layers ``--layers``): one set of weights, briefly trained with the
   ``--train_variant`` dynamics, then solved with each variant (sync, deq, eo, eo_deq) on the same test
   images; all reach the same fixed point, so only the cost differs.

    python3 bench/bench_deq.py            # ~1-2 minutes on one core
    python3 bench/bench_deq.py --quick    # seconds
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deq import fixed_point  # noqa: E402
from hopfield_deq import VARIANTS, HopfieldClassifier, convergence_iterations, load_split, train_epoch  # noqa: E402
from madam import Madam  # noqa: E402
import training  # noqa: E402


def synthetic_rows(dim: int, batch: int, norm: float, tol: float, repeats: int, seed: int) -> list[dict]:
    """Symmetric W with eigenvalues spread over [0, norm] and small inputs (tanh nearly linear), so the
    contraction factor really is ~norm and Picard needs ~log(tol) / log(norm) iterations."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    w = q @ torch.diag(torch.linspace(0.0, norm, dim)) @ q.T
    ux = 0.1 * torch.randn(batch, dim, generator=gen)
    rows = []
    for solver in ("picard", "anderson"):
        best = float("inf")
        for _ in range(repeats):
            _, stats = fixed_point(lambda z: torch.tanh(z @ w.T + ux), torch.zeros_like(ux), solver=solver,
                                   max_iter=1000, tol=tol)
            best = min(best, stats["seconds"])
        rows.append({"bench": f"tanh(Wz+Ux) d={dim} |W|={norm}", "method": solver,
                     "iterations": stats["iterations"], "seconds": best, "converged": stats["converged"]})
    return rows


def hopfield_rows(model: str, layers: list[int], train_variant: str, train_batches: int, n_test: int,
                  tol: float, repeats: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    train_x, train_y = load_split("train", 64 * train_batches, None, seed) if train_batches else (None, None)
    test_x, _ = load_split("test", n_test, None, 0)
    trained = HopfieldClassifier(layers, model, train_variant, tol=tol)
    if train_batches:
        train_epoch(trained, Madam(trained.parameters(), lr=0.01), train_x, train_y, 64,
                    torch.Generator().manual_seed(seed))
    rows = []
    for variant in VARIANTS:
        clf = HopfieldClassifier(layers, model, variant, forward_iter=200, tol=tol)
        clf.load_state_dict(trained.state_dict())
        clf.eval()
        best = float("inf")
        with torch.no_grad():
            for _ in range(repeats):
                clf(test_x)
                stats = clf.deq.last_stats
                best = min(best, stats["seconds"])
        per_sample, _ = convergence_iterations(stats["residuals_per_sample"], tol)
        rows.append({"bench": f"{model.upper()} {layers} ({train_batches} training batches)", "method": variant,
                     "iterations": stats["iterations"], "mean_sample_iterations": float(per_sample.float().mean()),
                     "t2c": float(per_sample.float().mean()) * (1 - clf.settings["damping"]),
                     "seconds": best, "converged": stats["converged"]})
    return rows


def print_with_ratios(rows: list[dict]) -> None:
    baseline = {}
    for r in rows:
        baseline.setdefault(r["bench"], r)
        base = baseline[r["bench"]]
        r["iter_ratio"] = r["iterations"] / base["iterations"]
        r["time_ratio"] = r["seconds"] / base["seconds"]
    print("| benchmark | method | iterations (all samples) | mean per-sample iters | t2c | seconds "
          "| iters / baseline | time / baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mean_it = f"{r['mean_sample_iterations']:.1f}" if "mean_sample_iterations" in r else ""
        t2c = f"{r['t2c']:.1f}" if "t2c" in r else ""
        flag = "" if r["converged"] else " (not converged)"
        print(f"| {r['bench']} | {r['method']}{flag} | {r['iterations']} | {mean_it} | {t2c} | {r['seconds']:.3f} "
              f"| {r['iter_ratio']:.2f} | {r['time_ratio']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=500)
    parser.add_argument("--norm", type=float, default=0.95, help="spectral norm of W (synthetic bench)")
    parser.add_argument("--skip_hopfield", action="store_true", help="only the synthetic benchmark")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual to reach")
    parser.add_argument("--layers", default="784,1990,10")
    parser.add_argument("--models", default="ham,chn")
    parser.add_argument("--train_variant", default="eo_deq", choices=VARIANTS)
    parser.add_argument("--train_batches", type=int, default=150, help="Madam steps before benchmarking")
    parser.add_argument("--n_test", type=int, default=512, help="test images solved at once")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench_deq.csv", help="CSV output path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.train_batches, args.n_test, args.repeats = 100, 5, 64, 1
    torch.set_num_threads(args.threads)
    training.log_config(args)
    layers = [int(v) for v in args.layers.split(",")]
    rows = synthetic_rows(args.dim, 64, args.norm, args.tol, args.repeats, args.seed)
    for model in [] if args.skip_hopfield else args.models.split(","):
        rows += hopfield_rows(model, layers, args.train_variant, args.train_batches, args.n_test, args.tol,
                              args.repeats, args.seed)
    print_with_ratios(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
