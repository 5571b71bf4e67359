"""Padded vs ragged bags in the batched real-world MIL trainer (``batched_mil.train_batched(ragged=...)``):
ratios measured in one process, per dataset, on one chunk of a protocol trial.

Padded: every bag of a training step is padded to the step's longest bag and the instance encoder and the
pooling run on the padding too. Ragged (``batched_mil.RaggedBagGatherer``): the encoder, bag dropout, the input
LayerNorm, the pooling scores and the pooled sums see only the real instances; only the map y_Omega reads the
scores placed back in the padded grid. Both compute the same model (tests/test_real_world_mil.py); the table
also shows how far their validation losses drift apart by float rounding over the timed epochs, beside a
control: the padded training again on inputs changed by a relative 1e-7 (a model near a tie of the sparse map
amplifies any rounding difference alike). ``real_world_mil.py --bag_layout auto`` picks ragged where the
longest bag holds >= ``real_world_mil.RAGGED_FROM`` times the mean bag's instances.

    python3 bench/bench_bag_layout.py            # writes results/bench/bench_bag_layout.{json,md}
    python3 bench/bench_bag_layout.py --quick    # seconds; writes results/quick/bench/
    python3 bench/bench_bag_layout.py --report   # the README block bench_bag_layout, from the committed run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

import batched_mil as bm  # noqa: E402
import real_world_mil as rw  # noqa: E402
from bench import bench_real_world  # noqa: E402
import training  # noqa: E402
from bench.common import (committed_report as common_report, fastest_seconds, measured_at, provenance,  # noqa: E402
                          report_block, write_result)

NOISE = 1e-7  # relative input noise of the rounding control: how far float rounding alone moves the training
SHAPE = {"emb_dims": 64, "emb_layers": 2, "hidden_dim": 32, "n_heads": 8, "batch_size": 4}  # mid-grid of Hu et al.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(rw.DATASETS), help="comma-separated (default: all six)")
    parser.add_argument("--epochs", type=training.positive_int, default=None, help="epochs per timed training (2)")
    parser.add_argument("--rounds", type=training.positive_int, default=None,
                        help="timed rounds per layout, fastest kept (default 3)")
    parser.add_argument("--max_models", type=training.positive_int, default=24,
                        help="models of the chunk (the protocol's chunk size, at most this)")
    parser.add_argument("--threads", type=training.positive_int, default=1, help="torch CPU threads (a trial's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="musk1 and fox, 1 epoch, 1 round (explicit flags win)")
    parser.add_argument("--out_dir", default=None, help="default results/bench (--quick: results/quick/bench)")
    parser.add_argument("--report", action="store_true",
                        help="only write the README block bench_bag_layout from results/bench/bench_bag_layout.json")
    args = parser.parse_args(argv)
    if args.quick and args.datasets == parser.get_default("datasets"):
        args.datasets = "musk1,fox"
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 3)
    unknown = sorted(set(args.datasets.split(",")) - set(rw.DATASETS))
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(rw.DATASETS)}")
    args.out_dir = str(args.out_dir or REPO_DIR / "results" / ("quick/bench" if args.quick else "bench"))
    return args


def chunk_training(dataset: str, max_models: int, seed: int):
    """A function training the first chunk of one protocol trial (shape ``SHAPE``, sparsemax) for given epochs
    and layout, returning its history; the chunk's model count; the dataset's longest / mean bag."""
    data, labels = bench_real_world.load(dataset)
    padded, lengths, _ = data
    group = next(g for g in rw.group_by_shape(rw.search_configs("hu", 0, 0))
                 if all(g[k] == v for k, v in SHAPE.items()))
    shape = rw.model_shape(padded.shape[-1], group, "per_head")
    per_chunk = rw.models_per_chunk(shape, 4, int(lengths.max()), rw.CHUNK_PARAMS, rw.CHUNK_ACTIVATIONS)
    n_models = min(max_models, rw.chunk_size(10 * len(group["variants"]), len(group["variants"]), per_chunk))
    splits, jobs = bench_real_world.trial_jobs(labels, group, n_models, seed)
    variants = [group["variants"][v] for _, v in jobs]
    tensor = lambda key: torch.tensor([float(var[key]) for var in variants])  # noqa: E731
    standardize = bench_real_world.standardization(data, splits, jobs)

    def train(epochs: int, ragged: bool, noise: float = 0.0) -> dict:
        """``noise`` > 0: the instances times (1 + noise * N(0, 1)), a rounding-sized change of the data."""
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(jobs))]
        model = bm.BatchedBagClassifier.initialized(shape, "sparsemax", tensor("scale"), tensor("dropout"), gens)
        inputs = data
        if noise:
            jitter = noise * torch.randn(padded.shape, generator=torch.Generator().manual_seed(seed))
            inputs = (padded * (1 + jitter), *data[1:])
        return bm.train_batched(model, inputs, labels, [splits[f]["train"].tolist() for f, _ in jobs],
                                {"val": [splits[f]["val"].tolist() for f, _ in jobs]}, tensor("lr"),
                                tensor("lr_decay"), epochs, generators=gens, standardize=standardize, ragged=ragged)
    return train, len(jobs), float(lengths.max() / lengths.float().mean())


def measure(dataset: str, args: argparse.Namespace) -> dict:
    train, n_models, spread = chunk_training(dataset, args.max_models, args.seed)
    seconds = {layout: fastest_seconds(lambda: train(args.epochs, layout == "ragged"), rounds=args.rounds)
               for layout in ("padded", "ragged")}
    padded_loss = train(args.epochs, False)["val_loss"]
    drift = float((train(args.epochs, True)["val_loss"] - padded_loss).abs().max())
    noise_drift = float((train(args.epochs, False, NOISE)["val_loss"] - padded_loss).abs().max())
    row = {"dataset": dataset, "models": n_models, "longest_over_mean_bag": spread,
           "auto_layout": "ragged" if spread >= rw.RAGGED_FROM else "padded",
           **{f"{k}_s": v for k, v in seconds.items()}, "speedup": seconds["padded"] / seconds["ragged"],
           "val_loss_max_abs_diff": drift, "noise_val_loss_max_abs_diff": noise_drift}
    print(f"{dataset:9s} {n_models} models, longest/mean bag {spread:.1f}: padded {seconds['padded']:.2f} s, "
          f"ragged {seconds['ragged']:.2f} s, {row['speedup']:.2f}x", flush=True)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        report_block("bench_bag_layout", markdown)
        return {}
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = training.log_config(args)
    rows = [measure(dataset, args) for dataset in args.datasets.split(",")]
    result = {"config": config, "rows": rows, **provenance(start)}
    write_result(result, args.out_dir, "bench_bag_layout", markdown)
    return result


def markdown(result: dict) -> str:
    config = result["config"]
    lines = [f"Padded vs ragged bags, one chunk of a protocol trial (E{SHAPE['emb_dims']} L{SHAPE['emb_layers']} "
             f"d{SHAPE['hidden_dim']} H{SHAPE['n_heads']}, sparsemax), {config['epochs']} epoch(s) of training + "
             f"validation, fastest of {config['rounds']}, {config['threads']} thread(s), one process:", "",
             "| dataset | models | longest / mean bag | --bag_layout auto | padded (s) | ragged (s) | speed-up | "
             f"val loss, max abs difference: ragged vs padded | padded, inputs x (1 + {NOISE:.0e} N(0,1)), vs padded |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['models']} | {r['longest_over_mean_bag']:.1f} | {r['auto_layout']} | "
              f"{r['padded_s']:.2f} | {r['ragged_s']:.2f} | {r['speedup']:.2f}x | {r['val_loss_max_abs_diff']:.1e} | "
              f"{r['noise_val_loss_max_abs_diff']:.1e} |"
              for r in result["rows"]]
    return "\n".join(lines + ["", measured_at(result)])


def committed_report() -> str:
    """The README block ``bench_bag_layout``: the table of the committed full run."""
    return common_report("bench_bag_layout", markdown)


if __name__ == "__main__":
    main()
