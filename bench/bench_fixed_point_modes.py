"""Iterations and time for Hopfield retrieval to reach its fixed point, per retrieval mode.

``Hopfield(..., update_steps=None)`` iterates q <- y_Omega(beta q K^T) K to the fixed point with the
DEQ solver of ``deq.py`` (implicit gradients). This benchmark runs that solve for every mode on the
same random stored patterns and queries, with Picard and Anderson, and prints per mode: the solver's
iterations to a relative residual < tol (mean over the batch: iterations of the slowest sample), the
forward+backward wall time relative to the softmax mode in the same process, and the fraction of
queries whose fixed point is a single stored pattern (support size 1, exact retrieval).

    python3 bench/bench_fixed_point_modes.py            # writes results/bench/bench_fixed_point_modes.{json,md}
    python3 bench/bench_fixed_point_modes.py --quick    # seconds; writes results/quick/bench/
    python3 bench/bench_fixed_point_modes.py --report   # the README block, from results/bench/<this name>.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
import deq  # noqa: E402
import training  # noqa: E402
from bench.common import (committed_report as common_report, measured_at, provenance, report_block,  # noqa: E402
                          write_result)
from layers import association  # noqa: E402

NAME = "bench_fixed_point_modes"

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_patterns", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--beta", type=float, default=4.0)
    parser.add_argument("--noise", type=float, default=0.5, help="query = stored pattern + noise * N(0, I/d)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max_iter", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=training.positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out_dir", default=None, help="default results/bench (--quick: results/quick/bench)")
    parser.add_argument("--report", action="store_true",
                        help=f"only write the README block {NAME} from results/bench/{NAME}.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_patterns, args.queries, args.repeats = 32, 64, 1
    args.out_dir = str(args.out_dir or REPO_DIR / "results" / ("quick/bench" if args.quick else "bench"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        report_block(NAME, markdown)
        return {}
    start = time.perf_counter()
    config = training.log_config(args)
    torch.set_num_threads(args.threads)
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
            rows.append(min(runs, key=lambda r: r["seconds"]))
    result = {"config": config, "rows": rows, **provenance(start)}
    write_result(result, args.out_dir, NAME, markdown)
    return result


def markdown(result: dict) -> str:
    """Per solver and mode: iterations, convergence, time against the softmax mode's with the same solver, and
    the share of exact retrievals; and where it was measured."""
    cfg, rows = result["config"], result["rows"]
    base = {r["solver"]: r["seconds"] for r in rows if r["mode"] == "softmax"}
    # runs before --threads existed ran on 1 thread (the count was fixed)
    lines = [f"Fixed point of q <- X^T y(beta X q): {cfg['n_patterns']} unit-norm stored patterns in {cfg['dim']}-d, "
             f"{cfg['queries']} queries = stored pattern + {cfg['noise']:g} N(0, I/d) noise, beta {cfg['beta']:g}, "
             f"tol {cfg['tol']:g} (at most {cfg['max_iter']} iterations); forward + implicit backward, best of "
             f"{cfg['repeats']}, {cfg.get('threads', 1)} thread(s)", "",
             "| solver | mode | iterations | converged | time vs softmax | fixed point = one stored pattern |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["mode"] + "".join(f" {k}={v:g}" for k, v in r["params"].items())
        lines.append(f"| {r['solver']} | {name} | {r['iterations']} | {'yes' if r['converged'] else 'no'} | "
                     f"{r['seconds'] / base[r['solver']]:.2f}x | {r['single_pattern_fraction']:.2f} |")
    tail = measured_at(result)
    return "\n".join(lines + (["", tail] if tail else []))


def committed_report() -> str:
    """The README block ``bench_fixed_point_modes``: the table of the committed full run."""
    return common_report(NAME, markdown)


if __name__ == "__main__":
    main()
