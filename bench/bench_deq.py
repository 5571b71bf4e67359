"""Benchmark: Anderson vs Picard and even/odd vs synchronous updates, iterations and wall time to the
same relative residual, all in one process; prints ratios against the Picard / synchronous baseline.

1. Synthetic DEQ z = tanh(W z + U x) (``--dim``, spectral norm ``--norm``): Picard vs Anderson.
2. MNIST Hopfield nets (CHN and HAM, layers ``--layers``): one set of weights, briefly trained with the
   ``--train_variant`` dynamics, then solved with each variant (sync, deq, eo, eo_deq) on the same test
   images; all reach the same fixed point, so only the cost differs.

3. Where the CHN's even/odd step spends its time (``--eo_cost``): one map evaluation of sync vs EO and
   EO's parts (the two drives, the exact block solves of the wide odd layer and the output layer) on a
   batch of 64 test images.
4. The paper-budget estimate (``--estimate_full``): the training step (forward solve + recurrent
   backprop + Madam) of every model x variant on the briefly trained weights, measured over
   ``--train_timing_batches`` batches, and the test pass, extrapolated to ``hopfield_deq.py --full``
   (10 epochs x 937 batches of 64, 3 runs, 8 model x variant, 2 trials at a time on 2 cores).

    python3 bench/bench_deq.py                                 # ~1-2 minutes on one core
    python3 bench/bench_deq.py --eo_cost --estimate_full       # + the EO breakdown and the estimate
    python3 bench/bench_deq.py --quick                         # seconds; writes results/quick/
    python3 bench/bench_deq.py --report                        # the README block, from results/bench/bench_deq.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

from deq import fixed_point  # noqa: E402
from hopfield_deq import (VARIANTS, HopfieldClassifier, chn_block_solve, convergence_iterations,  # noqa: E402
                          load_split, train_epoch)
from madam import Madam  # noqa: E402
import training  # noqa: E402
from bench.common import (committed_report as common_report, fastest_seconds, measured_at, provenance,  # noqa: E402
                          report_block, write_result)


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


def hopfield_rows(model: str, layers: list[int], state: dict, train_batches: int, n_test: int,
                  tol: float, repeats: int) -> list[dict]:
    """Every variant solving the same ``n_test`` test images with the same (briefly trained) weights."""
    test_x, _ = load_split("test", n_test, None, 0)
    rows = []
    for variant in VARIANTS:
        clf = HopfieldClassifier(layers, model, variant, forward_iter=200, tol=tol)
        clf.load_state_dict(state)
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


def trained_state(model: str, layers: list[int], train_variant: str, train_batches: int, seed: int) -> dict:
    """Weights after ``train_batches`` Madam steps of the ``train_variant`` dynamics (batch 64)."""
    torch.manual_seed(seed)
    trained = HopfieldClassifier(layers, model, train_variant, tol=1e-4)
    if train_batches:
        train_x, train_y = load_split("train", 64 * train_batches, None, seed)
        train_epoch(trained, Madam(trained.parameters(), lr=0.01), train_x, train_y, 64,
                    torch.Generator().manual_seed(seed))
    return trained.state_dict()


def eo_cost_rows(layers: list[int], state: dict, repeats: int) -> list[dict]:
    """ms per call of the CHN's sync map, its even/odd map and the EO map's parts, on 64 test images at
    the state reached after 10 EO steps from zero (a mid-solve state)."""
    clf = HopfieldClassifier(layers, "chn", "eo")
    clf.load_state_dict(state)
    net = clf.net
    x, _ = load_split("test", 64, None, 0)
    with torch.no_grad():
        ux = net.preprocess_inputs(x)
        even = clf.initial_state(x)
        for _ in range(10):
            even = net.eo_map(ux, even)
        states = net.odd_from_even(ux, even)
        drives = {i: net.drive(ux, states, i) for i in range(net.n_states)}
        parts = {"sync map (all layers, one step)": lambda: net.sync_map(ux, states),
                 "even/odd map (one step)": lambda: net.eo_map(ux, even)}
        for i in range(net.n_states):
            kind = "odd" if i in net.odd else "even"
            parts[f"  drive of layer {i + 1} ({kind}, width {layers[i + 1]})"] = lambda i=i: net.drive(ux, states, i)
            parts[f"  exact block solve of layer {i + 1} (width {layers[i + 1]})"] = \
                lambda i=i: chn_block_solve(drives[i])
        times = {name: 1e3 * fastest_seconds(fn, repeats) for name, fn in parts.items()}
    sync = times["sync map (all layers, one step)"]
    return [{"bench": "CHN step cost (64 images)", "part": name, "ms": ms, "x_sync_step": ms / sync}
            for name, ms in times.items()]


def training_cost_rows(layers: list[int], states: dict[str, dict], batches: int, seed: int) -> list[dict]:
    """ms per training batch (forward solve to 1e-4 + recurrent backprop + Madam step, batch 64) and per
    test batch (solve to 1e-4, no grad) of every model x variant, from the same briefly trained weights."""
    train_x, train_y = load_split("train", 64 * (batches + 1), None, seed + 1)
    test_x, _ = load_split("test", 512, None, 0)
    rows = []
    for model, state in states.items():
        for variant in VARIANTS:
            clf = HopfieldClassifier(layers, model, variant, tol=1e-4)
            clf.load_state_dict(state)
            optimizer = Madam(clf.parameters(), lr=0.01 / 10, p_scale=1024.0, g_bound=3.0)
            train_epoch(clf, optimizer, train_x[:64], train_y[:64], 64, torch.Generator().manual_seed(0))  # warm-up
            start = time.perf_counter()
            train_epoch(clf, optimizer, train_x[64:], train_y[64:], 64, torch.Generator().manual_seed(seed))
            train_ms = 1000.0 * (time.perf_counter() - start) / batches
            clf.eval()
            with torch.no_grad():
                start = time.perf_counter()
                for i in range(0, len(test_x), 64):
                    clf(test_x[i:i + 64])
                test_ms = 1000.0 * (time.perf_counter() - start) / (len(test_x) // 64)
            rows.append({"model": model, "variant": variant, "train_ms_per_batch": train_ms,
                         "test_ms_per_batch": test_ms})
    return rows


def full_budget_estimate(rows: list[dict], runs: int = 3, epochs: int = 10, n_train: int = 60_000,
                         n_test: int = 10_000, batch: int = 64, slots: int = 2) -> dict:
    """Wall time of ``hopfield_deq.py --full`` from measured per-batch costs: per run
    T = epochs * floor(n_train / batch) * t_train + ceil(n_test / batch) * t_test; the sweep runs
    runs x (model, variant) trials on ``slots`` parallel trial slots, so wall ~ sum(T) / slots
    (an upper bound on the makespan's balance loss is one longest trial)."""
    per_run = {f"{r['model']}/{r['variant']}": (epochs * (n_train // batch) * r["train_ms_per_batch"]
                                                + -(-n_test // batch) * r["test_ms_per_batch"]) / 1000.0
               for r in rows}
    total = runs * sum(per_run.values())
    return {"protocol": f"{epochs} epochs x {n_train // batch} batches of {batch}, {runs} runs, {len(per_run)} "
                        f"model x variant, {slots} trials at a time",
            "hours_per_run": {k: v / 3600 for k, v in per_run.items()},
            "compute_hours": total / 3600, "wall_hours_on_slots": total / slots / 3600,
            "wall_hours_upper": (total / slots + max(per_run.values())) / 3600}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=training.positive_int, default=500)
    parser.add_argument("--norm", type=training.open_fraction, default=0.95, help="spectral norm of W (synthetic bench)")
    parser.add_argument("--skip_hopfield", action="store_true", help="only the synthetic benchmark")
    parser.add_argument("--tol", type=training.open_fraction, default=1e-4, help="relative residual to reach")
    parser.add_argument("--layers", default="784,1990,10")
    parser.add_argument("--models", default="ham,chn")
    parser.add_argument("--train_variant", default="eo_deq", choices=VARIANTS)
    parser.add_argument("--train_batches", type=training.nonnegative_int, default=150,
                        help="Madam steps before benchmarking")
    parser.add_argument("--n_test", type=training.positive_int, default=512, help="test images solved at once")
    parser.add_argument("--repeats", type=training.positive_int, default=3, help="timing repeats (best of)")
    parser.add_argument("--threads", type=training.positive_int, default=1)
    parser.add_argument("--eo_cost", action="store_true", help="part 3: where the CHN even/odd step's time goes")
    parser.add_argument("--estimate_full", action="store_true",
                        help="part 4: training/test cost per batch and the --full wall-time estimate")
    parser.add_argument("--train_timing_batches", type=training.positive_int, default=10,
                        help="training batches timed per model x variant for --estimate_full")
    parser.add_argument("--out", default=None,
                        help="CSV output (default results/bench/bench_deq.csv; --quick: results/quick/bench_deq.csv); "
                             "the EO breakdown and the estimate go to the .json beside it")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--report", action="store_true",
                        help="only write the README block bench_deq from results/bench/bench_deq.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.train_batches, args.n_test, args.repeats, args.train_timing_batches = 100, 5, 64, 1, 2
    args.out = str(args.out or REPO_DIR / "results" / ("quick" if args.quick else "bench") / "bench_deq.csv")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        report_block("bench_deq", markdown)
        return {}
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = training.log_config(args)
    layers = [int(v) for v in args.layers.split(",")]
    models = [] if args.skip_hopfield else args.models.split(",")
    rows = synthetic_rows(args.dim, 64, args.norm, args.tol, args.repeats, args.seed)
    states = {m: trained_state(m, layers, args.train_variant, args.train_batches, args.seed) for m in models}
    for model in models:
        rows += hopfield_rows(model, layers, states[model], args.train_batches, args.n_test, args.tol,
                              args.repeats)
    print_with_ratios(rows)
    extra: dict = {"config": config, "threads": args.threads}
    if args.eo_cost and "chn" in states:
        extra["eo_cost"] = eo_cost_rows(layers, states["chn"], max(args.repeats, 5))
        print("\n| CHN step part (64 images) | ms | x sync step |\n|---|---|---|")
        for r in extra["eo_cost"]:
            print(f"| {r['part']} | {r['ms']:.2f} | {r['x_sync_step']:.2f} |")
    if args.estimate_full and states:
        extra["training_cost"] = training_cost_rows(layers, states, args.train_timing_batches, args.seed)
        extra["full_budget_estimate"] = full_budget_estimate(extra["training_cost"])
        print("\n| model | variant | ms / training batch | ms / test batch |\n|---|---|---|---|")
        for r in extra["training_cost"]:
            print(f"| {r['model']} | {r['variant']} | {r['train_ms_per_batch']:.0f} | {r['test_ms_per_batch']:.0f} |")
        est = extra["full_budget_estimate"]
        print(f"\nhopfield_deq.py --full ({est['protocol']}): {est['compute_hours']:.1f} compute hours, "
              f"~{est['wall_hours_on_slots']:.1f} h wall on 2 cores (<= {est['wall_hours_upper']:.1f} h)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    result = {**extra, "rows": rows, **provenance(start)}
    write_result(result, out.parent, out.stem, markdown)
    return result


def markdown(result: dict) -> str:
    """One line per benchmark (the synthetic DEQ, each Hopfield net): its variants' iterations and wall time
    against the first variant's (Picard, sync) on the same problem, and where it was measured."""
    cfg = result["config"]
    lines = [f"Iterations and wall time to relative residual {cfg['tol']:g}, best of {cfg['repeats']}, "
             f"{cfg['threads']} thread(s); Hopfield nets: one set of weights ({cfg['train_batches']} Madam batches "
             f"of {cfg['train_variant']} dynamics) solving the same {cfg['n_test']} test images with every variant", "",
             "| benchmark | variants | iterations (whole batch) | iterations vs the first | mean per sample "
             "| wall time vs the first |", "|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault(r["bench"], []).append(r)
    lines += [_bench_line(bench, rows) for bench, rows in groups.items()]
    lines += _eo_cost_lines(result.get("eo_cost", [])) + _training_cost_lines(result.get("training_cost", []))
    return "\n".join(lines + ["", measured_at(result)])


def _eo_cost_lines(rows: list[dict]) -> list[str]:
    """Part 3's table: one CHN map evaluation, sync vs even/odd, and the even/odd step's parts ([] if not run)."""
    if not rows:
        return []
    lines = ["", f"{rows[0]['bench']} (`--eo_cost`): one map evaluation, sync vs even/odd, and the even/odd step's parts:",
             "", "| part | ms | x sync step |", "|---|---|---|"]
    return lines + [f"| {r['part'].strip()} | {r['ms']:.2f} | {r['x_sync_step']:.2f} |" for r in rows]


def _training_cost_lines(rows: list[dict]) -> list[str]:
    """Part 4's table: ms per training and per test batch of 64 for every model x variant, and the CHN's
    training batch over the HAM's of the same variant ([] if not run)."""
    if not rows:
        return []
    train = {(r["model"], r["variant"]): r["train_ms_per_batch"] for r in rows}
    lines = ["", "Cost per batch of 64 (`--estimate_full`: forward solve + recurrent backprop + Madam step; test: "
             "the solve alone):", "", "| model | variant | ms / training batch | ms / test batch "
             "| training batch: CHN / HAM |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{train[r['model'], r['variant']] / train['ham', r['variant']]:.1f}x"
                 if r["model"] == "chn" and ("ham", r["variant"]) in train else "")
        lines.append(f"| {r['model']} | {r['variant']} | {r['train_ms_per_batch']:.0f} | "
                     f"{r['test_ms_per_batch']:.0f} | {ratio} |")
    return lines


def _bench_line(bench: str, rows: list[dict]) -> str:
    """A table line: each column lists the variants' values in order, "a / b / ..."."""
    def joined(fmt: Callable[[dict], str]) -> str:
        return " / ".join(fmt(r) for r in rows)
    per_sample = joined(lambda r: f"{r['mean_sample_iterations']:.1f}") if "mean_sample_iterations" in rows[0] else "-"
    cells = [bench.replace("|", "\\|"), joined(lambda r: r["method"] + ("" if r["converged"] else " (not converged)")),
             joined(lambda r: str(r["iterations"])), joined(lambda r: f"{r['iter_ratio']:.2f}"), per_sample,
             joined(lambda r: f"{r['time_ratio']:.2f}")]
    return "| " + " | ".join(cells) + " |"


def committed_report() -> str:
    """The README block ``bench_deq``: the table of the committed full run."""
    return common_report("bench_deq", markdown)


if __name__ == "__main__":
    main()
