"""Training throughput of the MNIST-bag classifier per retrieval mode, relative to softmax.

For each bag size, times one epoch of ``training.train_bag_classifier`` (the real loop: AdamW steps over
the training bags, then its eval-mode pass over them, plus a one-batch test pass) with the model of
``mnist_mil_main.py`` (d_model 512, 4 heads, 2 patterns by default) for every mode, in the same
process, interleaving modes over ``--repeats`` rounds and keeping each mode's fastest round. Prints a
markdown table of bags/s and the ratio  epoch time(mode) / epoch time(softmax)  (target: <= 1.5 for the
sparse maps), and writes it as CSV/JSON.

    python3 bench/bench_mil_epoch.py            # bag sizes 5 and 100, all modes, 1 thread; writes results/bench/
    python3 bench/bench_mil_epoch.py --quick    # smaller, seconds; writes results/quick/bench/
    python3 bench/bench_mil_epoch.py --report   # the README block, from results/bench/bench_mil_epoch.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

import datasets  # noqa: E402
import mnist_mil_main as mm  # noqa: E402
import sparsemax  # noqa: E402
import training  # noqa: E402
from bench.common import (committed_report as common_report, measured_at, provenance, report_block,  # noqa: E402
                          write_result)


DEFAULT_MODES = tuple(m for m in sparsemax.MODES if m != "sequential_k_subsets")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bag_sizes", type=int, nargs="+", default=[5, 100])
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES),
                        help="modes to time (softmax is always timed as the baseline); 'name:param' allowed; "
                             "default: all but sequential_k_subsets (an iterative active-set SparseMAP solver, "
                             "far slower; time it explicitly with --modes sequential_k_subsets --bag_sizes 5)")
    parser.add_argument("--n_bags", type=int, default=512, help="training bags per epoch")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--num_pattern", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all modes; fastest round is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="n_bags 128, repeats 2, bag sizes 5 and 50")
    parser.add_argument("--out_dir", default=None, help="default results/bench (--quick: results/quick/bench)")
    parser.add_argument("--report", action="store_true",
                        help="only write the README block bench_mil_epoch from results/bench/bench_mil_epoch.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_bags, args.repeats, args.bag_sizes = 128, 2, [5, 50]
    args.out_dir = args.out_dir or str(REPO_DIR / "results" / ("quick/bench" if args.quick else "bench"))
    args.modes = ["softmax"] + [m for m in dict.fromkeys(mm.canonical_mode(s, 2, None) for s in args.modes)
                                if m != "softmax"]
    return args


def epoch_seconds(mode: str, bags, args: argparse.Namespace) -> float:
    """Wall time of one ``train_bag_classifier`` epoch of a fresh model (after a warm-up forward)."""
    training.seed_everything(args.seed)
    model = mm.build_model(dict(mode=mode, encoder="mlp", d_model=args.d_model, n_heads=args.n_heads,
                                num_pattern=args.num_pattern, scale=0.1, update_steps=1, dropout=0.3))
    train, test = bags
    with torch.no_grad():
        model.to(args.device)(train[0][: args.batch_size].to(args.device))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    training.train_bag_classifier(model, train, test, epochs=1, batch_size=args.batch_size, seed=args.seed,
                                  device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def make_bags(bag_size: int, args: argparse.Namespace):
    images, labels = datasets.load_mnist("train")
    x, y = datasets.make_mnist_bags(images, labels, args.n_bags + args.batch_size, bag_size, seed=args.seed)
    x, y = torch.tensor(x), torch.tensor(y)
    n = args.n_bags
    return (x[:n], None, y[:n]), (x[n:], None, y[n:])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        report_block("bench_mil_epoch", markdown)
        return {}
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = training.log_config(args)
    rows = []
    for bag_size in args.bag_sizes:
        bags = make_bags(bag_size, args)
        times = {mode: [] for mode in args.modes}
        for round_ in range(args.repeats):
            for mode in args.modes:
                times[mode].append(epoch_seconds(mode, bags, args))
                print(f"bag_size {bag_size} round {round_ + 1}: {mode:<24} {times[mode][-1]:.2f} s", flush=True)
        base = min(times["softmax"])
        for mode in args.modes:
            best = min(times[mode])
            rows.append({"bag_size": bag_size, "mode": mode, "epoch_s": best, "bags_per_s": args.n_bags / best,
                         "ratio_vs_softmax": best / base, "all_epoch_s": times[mode]})
    result = {"config": config, "rows": rows, **provenance(start)}
    write_result(result, args.out_dir, "bench_mil_epoch", markdown)
    import pandas as pd

    pd.DataFrame(rows).drop(columns="all_epoch_s").to_csv(Path(args.out_dir) / "bench_mil_epoch.csv", index=False)
    return result


def markdown(result: dict) -> str:
    """bags/s and epoch time / softmax's per mode and bag size, the slowest mode, and where it was measured."""
    cfg, rows = result["config"], result["rows"]
    sizes = sorted({r["bag_size"] for r in rows})
    by = {(r["bag_size"], r["mode"]): r for r in rows}
    lines = [f"One training epoch of the MNIST-bag classifier ({cfg['n_bags']} bags, batch {cfg['batch_size']}, "
             f"d_model {cfg['d_model']}, {cfg['n_heads']} heads, {cfg['num_pattern']} patterns; {cfg['device']}, "
             f"{cfg['threads']} thread(s); fastest of {cfg['repeats']}); ratio = epoch time / softmax epoch time",
             "", "| mode | " + " | ".join(f"bag {s}: bags/s | bag {s}: x softmax" for s in sizes) + " |",
             "|---|" + "---|---|" * len(sizes)]
    for mode in cfg["modes"]:
        cells = [f"{by[s, mode]['bags_per_s']:.0f} | {by[s, mode]['ratio_vs_softmax']:.2f}" for s in sizes]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    slowest = max(rows, key=lambda r: r["ratio_vs_softmax"])
    others = max(r["ratio_vs_softmax"] for r in rows if r["mode"] != slowest["mode"])
    lines += ["", f"Slowest: {slowest['mode']}, {slowest['ratio_vs_softmax']:.2f}x softmax at bag "
              f"{slowest['bag_size']}; every other mode within {others:.2f}x at every bag size."]
    tail = measured_at(result)
    return "\n".join(lines + (["", tail] if tail else []))


def committed_report() -> str:
    """The README block ``bench_mil_epoch``: the table of the committed full run."""
    return common_report("bench_mil_epoch", markdown)


if __name__ == "__main__":
    main()
