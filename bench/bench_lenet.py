"""The K-MIL LeNet encoder's layout, fast (max-pool before ReLU, channels-last convs) vs textbook (ReLU before
max-pool, NCHW): ratios measured in one process, fp32 and bf16 autocast.

1. Encoder forward + backward on one K-MIL mini-batch's instances (16 bags of ~14 digits = 224 images).
2. The whole K-MIL training step (LeNet 500 -> HopfieldPooling -> head, BCE, backward, clipping, fused AdamW)
   on 16 bags of 14 digits, the setting of ``mnist_mil_main.py --k_mil K``.

Both layouts compute the same function (tests/test_mnist_mil.py, float64); only the speed differs.

    python3 bench/bench_lenet.py            # writes results/bench/bench_lenet.{json,md}
    python3 bench/bench_lenet.py --quick    # seconds; writes results/quick/bench/
    python3 bench/bench_lenet.py --report   # the README block bench_lenet, from results/bench/bench_lenet.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

import mnist_mil_main as mm  # noqa: E402
import training  # noqa: E402
from bench.common import (committed_report as common_report, fastest_seconds, measured_at, provenance,  # noqa: E402
                          report_block, write_result)

LAYOUTS = ("textbook", "fast")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=training.positive_int, default=None,
                        help="timed calls per measurement, fastest of 3 kept (default 20)")
    parser.add_argument("--threads", type=training.positive_int, default=1, help="torch CPU threads (a trial's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 repeats (explicit flags win)")
    parser.add_argument("--out_dir", default=None, help="default results/bench (--quick: results/quick/bench)")
    parser.add_argument("--report", action="store_true",
                        help="only write the README block bench_lenet from results/bench/bench_lenet.json")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 20
    args.out_dir = str(args.out_dir or REPO_DIR / "results" / ("quick/bench" if args.quick else "bench"))
    return args


def fastest_ms(fn, repeats: int) -> float:
    """Fastest of 3 rounds of ``repeats`` calls, ms per call (after 2 warm-up calls)."""
    return 1e3 * fastest_seconds(fn, rounds=3, calls=repeats, warmup=2)


def encoder_ms(layout: str, precision: str, repeats: int) -> float:
    encoder = mm.lenet_encoder(500, layout)
    images = torch.rand(224, 28, 28).to(mm.image_dtype(precision))

    def step() -> None:
        with training.autocast(precision, "cpu"):
            out = encoder(images)
        out.float().sum().backward()
    return fastest_ms(step, repeats)


def kmil_step_ms(layout: str, precision: str, repeats: int) -> float:
    config = {**mm.KMIL_DEFAULTS, "mode": "sparsemax", "encoder": "lenet", "map_params": {}}
    model = mm.build_model(config)
    model.encoder = mm.lenet_encoder(config["d_model"], layout)
    optimizer = training.adamw(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    bags, labels = torch.rand(16, 14, 28, 28).to(mm.image_dtype(precision)), (torch.arange(16) % 2).float()

    def step() -> None:
        with training.autocast(precision, "cpu"):
            loss = F.binary_cross_entropy_with_logits(training.full_precision(model(bags)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        optimizer.step()
    return fastest_ms(step, repeats)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        report_block("bench_lenet", markdown)
        return {}
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = training.log_config(args)
    rows = []
    for part, fn in (("encoder fwd+bwd, 224 images", encoder_ms), ("K-MIL training step, 16 bags x 14", kmil_step_ms)):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(args.seed)
            ms = {layout: fn(layout, precision, args.repeats) for layout in LAYOUTS}
            rows.append({"part": part, "precision": precision, **{f"{k}_ms": v for k, v in ms.items()},
                         "speedup": ms["textbook"] / ms["fast"]})
            print(f"{part:36s} {precision}: textbook {ms['textbook']:.1f} ms, fast {ms['fast']:.1f} ms, "
                  f"{rows[-1]['speedup']:.2f}x", flush=True)
    result = {"config": config, "rows": rows, **provenance(start)}
    write_result(result, args.out_dir, "bench_lenet", markdown)
    return result


def markdown(result: dict) -> str:
    lines = [f"LeNet layout, textbook vs fast ({result['config']['threads']} thread(s), fastest of 3 x "
             f"{result['config']['repeats']} calls, one process)", "",
             "| part | precision | textbook (ms) | fast (ms) | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['precision']} | {r['textbook_ms']:.1f} | {r['fast_ms']:.1f} | {r['speedup']:.2f}x |"
              for r in result["rows"]]
    return "\n".join(lines + ["", measured_at(result)])


def committed_report() -> str:
    """The README block ``bench_lenet``: the table of the committed full run."""
    return common_report("bench_lenet", markdown)


if __name__ == "__main__":
    main()
