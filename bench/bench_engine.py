"""The training engine's speed targets, as ratios measured in one process (issue: paper-scale training).

1. MNIST-bag training step (batch 256 bags, d_model 512, 4 heads, 2 query patterns, forward + backward +
   AdamW), bf16 autocast vs fp32, at bag sizes 5 and 100; and the bag-100 bf16 step against its matmul
   floor = counted matmul FLOPs / the bf16 GEMM rate measured here (a (B N) x 784 @ 784 x 512 product).
2. K-MIL epoch (LeNet encoder, batch 16 bags of ~N(10, 2) digits): 5 seeds as one stacked model
   (``batched_mil.train_stacked``) vs the 5 seeds trained one after the other, bags/s, fp32 and bf16.
3. Real-world MIL (Fox): the batched trainer (``batched_mil.train_batched``) on the --search small shape and on
   Hu et al.'s largest shape, bf16 vs fp32 (why ``real_world_mil.py --precision auto`` is fp32 on the CPU).

    python3 bench/bench_engine.py            # writes results/bench/bench_engine.{json,md}
    python3 bench/bench_engine.py --quick    # seconds; writes results/quick/bench/
    python3 bench/bench_engine.py --report   # the README table, from results/bench/bench_engine.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

import batched_mil as bm  # noqa: E402
import datasets  # noqa: E402
import mnist_mil_main as mm  # noqa: E402
import real_world_mil as rw  # noqa: E402
import training  # noqa: E402
from bench.common import (committed_report as common_report, fastest_seconds, measured_at, provenance,  # noqa: E402
                          report_block, target_cell, write_result)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bag_sizes", type=training.positive_int, nargs="+", default=None, help="default 5 100")
    parser.add_argument("--steps", type=training.positive_int, default=None,
                        help="timed MNIST-bag steps, fastest kept (default 5)")
    parser.add_argument("--kmil_bags", type=training.positive_int, default=None,
                        help="K-MIL training bags timed (default 160)")
    parser.add_argument("--seeds", type=training.positive_int, default=None, help="stacked K-MIL seeds (default 5)")
    parser.add_argument("--rw_models", type=training.positive_int, default=None,
                        help="real-world models trained together (default 24)")
    parser.add_argument("--rw_epochs", type=training.positive_int, default=None, help="real-world epochs (default 3)")
    parser.add_argument("--threads", type=training.positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--mode", default="sparsemax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="bag sizes 5 and 20, 2 steps, 32 K-MIL bags, 2 seeds (explicit flags win)")
    parser.add_argument("--out_dir", default=None, help="default results/bench (--quick: results/quick/bench)")
    parser.add_argument("--report", action="store_true",
                        help="only write the README block bench_engine from results/bench/bench_engine.json")
    args = parser.parse_args(argv)
    defaults = dict(bag_sizes=[5, 20], steps=2, kmil_bags=32, seeds=2, rw_models=2, rw_epochs=1) if args.quick else \
        dict(bag_sizes=[5, 100], steps=5, kmil_bags=160, seeds=5, rw_models=24, rw_epochs=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out_dir = args.out_dir or str(REPO_DIR / "results" / ("quick/bench" if args.quick else "bench"))
    return args


def gemm_rate_bf16(rows: int) -> float:
    """FLOP/s of a bf16 (rows x 784) @ (784 x 512) matmul (the encoder's GEMM)."""
    a, b = torch.rand(rows, 784).bfloat16(), torch.rand(784, 512).bfloat16()
    return 2 * rows * 784 * 512 / fastest_seconds(lambda: a @ b, 5)


def bag_step_flops(batch: int, bag: int, d: int = 512, heads: int = 4, patterns: int = 2) -> float:
    """Matmul FLOPs of one training step of the MNIST-bag classifier: the encoder (forward, weight gradient;
    the images need no gradient) and the folded pooling's two bag-level products (forward, two backward)."""
    instances = batch * bag
    encoder = 2 * (2 * instances * 784 * d)
    pooling = 3 * 2 * (2 * batch * heads * patterns * bag * d)
    return encoder + pooling


def mnist_step_seconds(bag: int, precision: str, args: argparse.Namespace) -> tuple[float, float]:
    """(training step, eval-mode forward of the same batch) in seconds."""
    training.seed_everything(args.seed)
    model = mm.build_model(dict(mode=args.mode, encoder="mlp", d_model=512, n_heads=4, num_pattern=2, scale=0.1,
                                update_steps=1, dropout=0.3))
    optimizer = training.adamw(model.parameters(), lr=1e-4, weight_decay=1e-3)
    x, y = torch.rand(256, bag, 28, 28).to(mm.image_dtype(precision)), (torch.rand(256) > 0.5).float()

    def step() -> None:
        with training.autocast(precision, "cpu"):
            loss = F.binary_cross_entropy_with_logits(training.full_precision(model(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad(), training.autocast(precision, "cpu"):
            model(x)
        model.train()

    return fastest_seconds(step, args.steps), fastest_seconds(evaluate, args.steps)


KMIL_WIDTH = mm.KMIL_DEFAULTS["d_model"]  # K-MIL as mnist_mil_main.py trains it (bags of mm.KMIL_BAGS sizes)


def kmil_epoch_seconds(stacked: bool, precision: str, args: argparse.Namespace) -> float:
    splits = datasets.kmil_splits(2, seed=args.seed, n_train=args.kmil_bags, n_val=16, n_test=16, **mm.KMIL_BAGS)
    train = mm.split_tensors(dict(zip(("bags", "mask"), datasets.pad_bags(splits["train"][0])),
                                  labels=splits["train"][1]), mm.image_dtype(precision))
    config = dict(mode=args.mode, encoder="lenet", d_model=KMIL_WIDTH, n_heads=4, num_pattern=1, update_steps=1,
                  dropout=0.0, scale=None)
    seeds = list(range(args.seeds))

    def build(seed: int):
        training.seed_everything(seed)
        return mm.build_model(config)

    def run() -> None:
        if stacked:
            shape = bm.Shape(d_in=bm.LENET_FEATURES, emb_dims=KMIL_WIDTH, emb_layers=1, width=KMIL_WIDTH, n_heads=4,
                             emb_proj=False, lenet=True)
            bm.train_stacked(bm.BatchedBagClassifier.from_models([build(s) for s in seeds], shape), train, {}, seeds,
                             epochs=1, lr=1e-4, weight_decay=1e-4, batch_size=16, grad_clip=1.0, precision=precision)
        else:
            for seed in seeds:
                _train_only(build(seed), train, seed, precision)
    return fastest_seconds(run, 1)


def real_world_epoch_seconds(emb_dims: int, hidden_dim: int, precision: str, n_models: int, epochs: int) -> float:
    """``n_models`` Fox models of one shape (1 embedding layer, 8 heads, batch 4) trained ``epochs`` epochs
    on fold 0 of repetition 0, with their per-epoch validation pass."""
    bags = rw.training_data("fox")
    data = bm.pad_dataset([torch.from_numpy(x) for x, _ in bags])
    labels = torch.tensor([y for _, y in bags])
    split = rw.cv_splits(labels.numpy(), 10, 0, 0.2)[0]
    shape = rw.model_shape(data[0].shape[-1], {"emb_dims": emb_dims, "emb_layers": 1, "hidden_dim": hidden_dim,
                                               "n_heads": 8}, "per_head")
    gens = [torch.Generator().manual_seed(i) for i in range(n_models)]

    def run() -> None:
        model = bm.BatchedBagClassifier.initialized(shape, "sparsemax", torch.full((n_models,), 0.1),
                                                    torch.zeros(n_models), gens)
        bm.train_batched(model, data, labels, [split["train"].tolist()] * n_models,
                         {"val": [split["val"].tolist()] * n_models}, lr=torch.full((n_models,), 1e-3),
                         lr_decay=torch.full((n_models,), 0.98), epochs=epochs, generators=gens, precision=precision)
    return fastest_seconds(run, 1)


def _train_only(model, train, seed: int, precision: str) -> None:
    """One epoch of train_bag_classifier without a test pass (what stacking is timed against)."""
    training.train_bag_classifier(model, train, None, epochs=1, lr=1e-4, weight_decay=1e-4, batch_size=16,
                                  grad_clip=1.0, seed=seed, precision=precision, train_metrics="running")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        report_block("bench_engine", markdown)
        return {}
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = training.log_config(args)
    result = {"config": config, "cpu_has_bf16": training.cpu_has_bf16(),
              "mnist_step": [], "kmil": [], "kmil_setting": {"width": KMIL_WIDTH, **mm.KMIL_BAGS}}
    for bag in args.bag_sizes:
        (fp32, _), (bf16, bf16_eval) = (mnist_step_seconds(bag, p, args) for p in ("fp32", "bf16"))
        floor = bag_step_flops(256, bag) / gemm_rate_bf16(256 * bag)
        row = {"bag_size": bag, "fp32_s": fp32, "bf16_s": bf16, "speedup_bf16": fp32 / bf16,
               "bf16_matmul_floor_s": floor, "bf16_vs_floor": bf16 / floor,
               "train_eval_pass_share": bf16_eval / bf16}
        result["mnist_step"].append(row)
        print(json.dumps(row), flush=True)
    for precision in ("fp32", "bf16"):
        separate, stacked = (kmil_epoch_seconds(s, precision, args) for s in (False, True))
        bags = args.seeds * args.kmil_bags
        row = {"precision": precision, "seeds": args.seeds, "separate_bags_per_s": bags / separate,
               "stacked_bags_per_s": bags / stacked, "speedup_stacked": separate / stacked}
        result["kmil"].append(row)
        print(json.dumps(row), flush=True)
    result["real_world"] = []
    for emb_dims, hidden_dim in ((32, 16), (128, 64)):
        fp32, bf16 = (real_world_epoch_seconds(emb_dims, hidden_dim, p, args.rw_models, args.rw_epochs)
                      for p in ("fp32", "bf16"))
        row = {"emb_dims": emb_dims, "hidden_dim": hidden_dim, "models": args.rw_models, "fp32_s": fp32,
               "bf16_s": bf16, "speedup_bf16": fp32 / bf16}
        result["real_world"].append(row)
        print(json.dumps(row), flush=True)
    result.update(provenance(start))
    write_result(result, args.out_dir, "bench_engine", markdown)
    return result


# Issue targets (paper-scale training): bf16 step speedup per bag size, bf16 step / matmul floor, stacked K-MIL speedup
TARGETS = {"speedup_bf16": {5: 2.0, 100: 3.0}, "bf16_vs_floor": {100: 2.0}, "speedup_stacked": 5.0}


def markdown(result: dict) -> str:
    """The three tables of a bench_engine result, with the issue's targets beside the measured ratios."""
    cfg = result["config"]
    lines = [f"MNIST-bag training step ({cfg['mode']}, batch 256, d_model 512; {cfg['threads']} threads; fastest of "
             f"{cfg['steps']}); eval pass = an eval-mode forward of the batch / the bf16 training step (the cost of "
             "--train_metrics eval)", "",
             "| bag | fp32 (ms) | bf16 (ms) | bf16 speedup | target | bf16 matmul floor (ms) | bf16 / floor | target "
             "| eval pass |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["mnist_step"]:
        bag = r["bag_size"]
        lines.append(f"| {bag} | {1e3 * r['fp32_s']:.0f} | {1e3 * r['bf16_s']:.0f} | {r['speedup_bf16']:.2f}x | "
                     f"{target_cell(r['speedup_bf16'], TARGETS['speedup_bf16'].get(bag))} | "
                     f"{1e3 * r['bf16_matmul_floor_s']:.0f} | {r['bf16_vs_floor']:.1f}x | "
                     f"{target_cell(r['bf16_vs_floor'], TARGETS['bf16_vs_floor'].get(bag), at_least=False)} | "
                     f"{100 * r['train_eval_pass_share']:.0f} % |")
    # runs before kmil_setting was recorded used LeNet width 128 and datasets.make_kmil_bags' default bag sizes
    kmil = result.get("kmil_setting", {"width": 128, "mean_bag_size": 10.0, "std_bag_size": 2.0, "rounding": "nearest"})
    lines += ["", f"K-MIL epoch ({cfg['kmil_bags']} bags of ~N({kmil['mean_bag_size']:g}, {kmil['std_bag_size']:g}) "
              f"digits ({kmil['rounding']}), batch 16, LeNet width {kmil['width']}): {cfg['seeds']} seeds stacked "
              "vs one after the other", "",
              "| precision | separate (bags/s) | stacked (bags/s) | speedup | target |", "|---|---|---|---|---|"]
    for r in result["kmil"]:
        lines.append(f"| {r['precision']} | {r['separate_bags_per_s']:.0f} | {r['stacked_bags_per_s']:.0f} | "
                     f"{r['speedup_stacked']:.2f}x | {target_cell(r['speedup_stacked'], TARGETS['speedup_stacked'])} |")
    lines += ["", f"Real-world MIL (Fox, fold 0): {cfg['rw_models']} models of one shape, {cfg['rw_epochs']} epochs "
              "with validation", "", "| shape (emb_dims, hidden per head, 8 heads) | fp32 (s) | bf16 (s) | bf16 speedup |",
              "|---|---|---|---|"]
    for r in result["real_world"]:
        lines.append(f"| {r['emb_dims']}, {r['hidden_dim']} | {r['fp32_s']:.2f} | {r['bf16_s']:.2f} | "
                     f"{r['speedup_bf16']:.2f}x |")
    return "\n".join(lines + ["", measured_at(result)])


def committed_report() -> str:
    """The README block ``bench_engine``: the tables of the committed full run."""
    return common_report("bench_engine", markdown)


if __name__ == "__main__":
    main()
