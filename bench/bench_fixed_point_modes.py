"""Iterations and time for Hopfield retrieval to reach its fixed point, per retrieval mode.

``Hopfield(..., update_steps=None)`` iterates q <- y_Omega(beta q K^T) K to the fixed point with the
DEQ solver of ``deq.py`` (implicit gradients). This benchmark runs that solve for every mode on the
same random stored patterns and queries, with Picard and Anderson, and prints per mode: the solver's
iterations to a relative residual < tol (mean over the batch: iterations of the slowest sample), the
forward+backward wall time relative to the softmax mode in the same process, and the fraction of
queries whose fixed point is a single stored pattern (support size 1, exact retrieval).

    python3 bench/bench_fixed_point_modes.py [--beta 4] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deq  # noqa: E402
import training  # noqa: E402
from layers import association  # noqa: E402

MODES = [("softmax", {}), ("sparsemax", {}), ("entmax", {}), ("entmax_alpha", {"alpha": 1.25}),
         ("normmax", {"alpha": 2.0}), ("k_subsets", {"k": 2})]


def solve_once(mode: str, params: dict, X: torch.Tensor, q0: torch.Tensor, beta: float, solver: str,
               tol: float, max_iter: int) -> dict:
    """Fixed point of q <- X^T y(beta X q) and one implicit backward pass; returns its statistics."""
    X = X.clone().requires_grad_(True)

    def update(q: torch.Tensor) -> torch.Tensor:
        return association(q, X, beta, mode, **params) @ X

    start = time.perf_counter()
    q_star, stats = deq.fixed_point(update, q0, solver=solver, max_iter=max_iter, tol=tol,
                                    backward_tol=1e-6)
    q_star.pow(2).sum().backward()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        support = (association(q_star, X, beta, mode, **params) > 0).sum(-1)
    return {"mode": mode, "params": params, "solver": solver, "iterations": stats["iterations"],
            "converged": bool(stats["converged"]), "seconds": seconds,
            "backward_iterations": stats.get("backward", {}).get("iterations"),
            "single_pattern_fraction": float((support == 1).float().mean())}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_patterns", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--beta", type=float, default=4.0)
    parser.add_argument("--noise", type=float, default=0.5, help="query = stored pattern + noise * N(0, I/d)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max_iter", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", default=None, help="default results/bench/fixed_point_modes.json "
                                                    "(--quick: results/quick/bench/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_patterns, args.queries, args.repeats = 32, 64, 1
    results = Path(__file__).resolve().parents[1] / "results"
    args.out = args.out or str(results / ("quick/bench" if args.quick else "bench") / "fixed_point_modes.json")
    training.log_config(args)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    X = torch.randn(args.n_patterns, args.dim, generator=g)
    X = X / X.norm(dim=-1, keepdim=True)
    picks = torch.randint(args.n_patterns, (args.queries,), generator=g)
    q0 = X[picks] + args.noise * torch.randn(args.queries, args.dim, generator=g) / args.dim ** 0.5

    rows = []
    for solver in ("picard", "anderson"):
        for mode, params in MODES:
            runs = [solve_once(mode, params, X, q0, args.beta, solver, args.tol, args.max_iter)
                    for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            rows.append(best)
    base = {r["solver"]: r["seconds"] for r in rows if r["mode"] == "softmax"}
    print(f"\nfixed point of q <- X^T y(beta X q): N={args.n_patterns} d={args.dim} queries={args.queries} "
          f"beta={args.beta} tol={args.tol}; fwd+implicit bwd, best of {args.repeats}, 1 thread\n")
    print("| solver | mode | iterations | converged | time vs softmax | single-pattern fixed points |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = r["mode"] + "".join(f" {k}={v}" for k, v in r["params"].items())
        print(f"| {r['solver']} | {name} | {r['iterations']} | {r['converged']} | "
              f"{r['seconds'] / base[r['solver']]:.2f}x | {r['single_pattern_fraction']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
