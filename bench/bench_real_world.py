"""Speed of the batched MIL trainer (``batched_mil.train_batched``) vs training the same configs one by
one, in one process, on a real MIL dataset; and an extrapolation of the full protocol's wall time.

    python3 bench/bench_real_world.py                       # ratio table (fox, 3 shapes) + extrapolation
    python3 bench/bench_real_world.py --quick               # seconds
    python3 bench/bench_real_world.py --datasets fox,ucsb --shapes 6 --pool_width total
    python3 bench/bench_real_world.py --report              # the README block bench_real_world (committed runs)

Timings use the process's CPU seconds by default (``--clock cpu``; the fair measure on a shared
machine, since one trial runs on one core); ``--clock wall`` for elapsed time.

Part 1 (measured): K = --models configs of one shape (the variants x folds of one repetition, as in
a Ray trial) are trained for --epochs epochs (a) one by one with the unbatched reference model
(``training.BagClassifier`` + ``torch.optim.AdamW``, same protocol), (b) one by one with the batched
trainer at M = 1, (c) all K at once. Throughput = trainings (of --epochs epochs) per second.

Part 2 (extrapolated, labeled so): for each dataset, one epoch of one chunk of a trial is timed for
--shapes shapes of the search space (all 36 of the Hu et al. grid by default); seconds per
model-epoch x (models per shape = variants x folds x repetitions) x 50 epochs, summed over the shape
grid (sampled shapes stand for the unsampled ones of equal pooling size d_model x n_heads*head_dim),
divided by the number of trials running in parallel (--parallel, default 2 = one per core).

Part 3 (--lower_bound, counted + measured): the full grid's model steps, parameter-element steps and
forward/backward FLOPs, divided by this machine's measured batched-matmul GFLOP/s and fused-AdamW
bandwidth: a floor for the full protocol on --parallel cores, whatever the overheads.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import batched_mil as bm  # noqa: E402
import real_world_mil as rw  # noqa: E402
import training  # noqa: E402
from bench.common import COMMITTED_DIR, write_block  # noqa: E402


KEY = "cpu"  # which clock the tables use (set by --clock)
ADAMW_BYTES_PER_ELEMENT = 28  # fused AdamW step: read p, g, m, v; write p, m, v (4 B each)
ALL_DATASETS = COMMITTED_DIR / "bench_real_world_per_head_all_datasets.json"  # parts 2 and 3, every dataset
RATIOS = COMMITTED_DIR / "bench_real_world_per_head.json"  # part 1 (fox)


def load(dataset: str):
    bags = rw.training_data(dataset)
    data = bm.pad_dataset([torch.from_numpy(np.array(x)) for x, _ in bags])
    labels = torch.tensor([y for _, y in bags])
    return data, labels


def trial_jobs(labels: torch.Tensor, group: dict, n_models: int, seed: int = 0):
    """The first ``n_models`` (fold, variant) models of a trial, with their splits and variants."""
    splits = rw.cv_splits(labels.numpy(), 10, seed, 0.2)
    jobs = [(f, v) for f in range(10) for v in range(len(group["variants"]))][:n_models]
    return splits, jobs


def standardization(data, splits, jobs):
    padded, lengths, _ = data
    stats = [rw._standardization(padded, lengths, splits[f]["train"]) for f, _ in jobs]
    return torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])


def clock() -> tuple[float, float]:
    """(wall, CPU seconds of this process): on a shared machine CPU time is the fairer measure."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> dict:
    wall, cpu = clock()
    return {"wall": wall - start[0], "cpu": cpu - start[1]}


def run_batched(data, labels, shape, mode, group, splits, jobs, epochs) -> dict:
    """Train the jobs as one batched model; returns {"wall", "cpu"} seconds."""
    variants = [group["variants"][v] for _, v in jobs]
    tensor = lambda key: torch.tensor([float(var[key]) for var in variants])  # noqa: E731
    gens = [torch.Generator().manual_seed(i) for i in range(len(jobs))]
    start = clock()
    model = bm.BatchedBagClassifier.initialized(shape, mode, tensor("scale"), tensor("dropout"), gens)
    bm.train_batched(model, data, labels, [splits[f]["train"].tolist() for f, _ in jobs],
                     {"val": [splits[f]["val"].tolist() for f, _ in jobs],
                      "test": [splits[f]["test"].tolist() for f, _ in jobs]},
                     tensor("lr"), tensor("lr_decay"), epochs, batch_size=group["batch_size"],
                     generators=gens, standardize=standardization(data, splits, jobs))
    return since(start)


def run_reference_one(data, labels, shape, mode, variant, split, stats, epochs, batch_size, seed) -> None:
    """One model, unbatched: BagClassifier + torch AdamW + clip, lr decay per epoch, val/test eval."""
    padded, lengths, pad = data
    x_all = ((padded - stats[0]) / stats[1]).masked_fill(pad.unsqueeze(-1), 0.0)
    torch.manual_seed(seed)
    model = bm.reference_model(shape, mode, variant["scale"], variant["dropout"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=variant["lr"], weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, variant["lr_decay"])
    gen = torch.Generator().manual_seed(seed)
    train = torch.as_tensor(split["train"])
    for _ in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train), generator=gen)].split(batch_size):
            n = int(lengths[idx].max())
            loss = F.binary_cross_entropy_with_logits(model(x_all[idx, :n], pad[idx, :n]), labels[idx].float())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        scheduler.step()
        for part in ("val", "test"):
            idx = torch.as_tensor(split[part])
            n = int(lengths[idx].max())
            training.evaluate_bags(model, x_all[idx, :n], pad[idx, :n], labels[idx])


def shape_name(shape: bm.Shape) -> str:
    """E<emb_dims> L<emb_layers> w<pooling d_model> H<heads> d<head_dim>."""
    return f"E{shape.emb_dims} L{shape.emb_layers} w{shape.width} H{shape.n_heads} d{shape.d_head}"


def cost_key(group: dict, how: str) -> tuple[int, int]:
    """Shapes of (about) equal cost: pooling d_model x head width, then embedding size."""
    shape = rw.model_shape(1, group, how)
    return shape.width * shape.inner, group["emb_dims"] * group["emb_layers"]


def warm_up(data, labels, shape, mode, group, reference: bool = False) -> None:
    """One untimed 1-epoch training of 2 models (and 1 reference model): JIT compilation (numba kernels
    of the optimizer and of the maps), caches and allocator pools are then not billed to the first shape."""
    splits, jobs = trial_jobs(labels, group, 2)
    run_batched(data, labels, shape, mode, group, splits, jobs, epochs=1)
    if reference:
        mean, std = standardization(data, splits, jobs[:1])
        run_reference_one(data, labels, shape, mode, group["variants"][0], splits[0], (mean[0], std[0]), 1,
                          group["batch_size"], seed=0)


def ratio_table(dataset: str, mode: str, n_models: int, epochs: int, how: str, shapes: list[dict]) -> list[dict]:
    data, labels = load(dataset)
    rows = []
    if shapes:
        warm_up(data, labels, rw.model_shape(data[0].shape[-1], shapes[0], how), mode, shapes[0], reference=True)
    for group in shapes:
        shape = rw.model_shape(data[0].shape[-1], group, how)
        splits, jobs = trial_jobs(labels, group, n_models)
        t_batched = run_batched(data, labels, shape, mode, group, splits, jobs, epochs)[KEY]
        t_single = sum(run_batched(data, labels, shape, mode, group, splits, [job], epochs)[KEY] for job in jobs)
        mean, std = standardization(data, splits, jobs)
        start = clock()
        for i, (f, v) in enumerate(jobs):
            run_reference_one(data, labels, shape, mode, group["variants"][v], splits[f], (mean[i], std[i]),
                              epochs, group["batch_size"], seed=i)
        t_reference = since(start)[KEY]
        row = {"dataset": dataset, "shape": shape_name(shape),
               "models": len(jobs), "epochs": epochs,
               "reference_per_s": len(jobs) / t_reference, "batched_M1_per_s": len(jobs) / t_single,
               "batched_per_s": len(jobs) / t_batched}
        row["speedup_vs_reference"] = row["batched_per_s"] / row["reference_per_s"]
        row["speedup_vs_M1"] = row["batched_per_s"] / row["batched_M1_per_s"]
        rows.append(row)
        print(f"{row['shape']:>22}: reference {row['reference_per_s']:.3f}/s, batched M=1 "
              f"{row['batched_M1_per_s']:.3f}/s, batched M={len(jobs)} {row['batched_per_s']:.3f}/s -> "
              f"x{row['speedup_vs_reference']:.1f} vs reference, x{row['speedup_vs_M1']:.1f} vs M=1", flush=True)
    return rows


def extrapolate(dataset: str, mode: str, how: str, n_shapes: int, parallel: int, chunk_params: float,
                epochs_full: int = 50, n_seeds: int = 5, n_folds: int = 10) -> dict:
    """Time one epoch of one trial chunk per sampled shape; extrapolate the full grid (see module doc)."""
    data, labels = load(dataset)
    groups = rw.group_by_shape(rw.search_configs("hu", 0, 0))
    sizes = sorted({cost_key(g, how)[0] for g in groups})
    # sample shapes evenly spread over the shapes sorted by cost (pooling size, then embedding size)
    by_cost = sorted(range(len(groups)), key=lambda i: cost_key(groups[i], how))
    picks = np.linspace(0, len(groups) - 1, min(n_shapes, len(groups))).round().astype(int)
    sample = sorted({by_cost[k] for k in picks})
    warm_up(data, labels, rw.model_shape(data[0].shape[-1], groups[sample[0]], how), mode, groups[sample[0]])
    per_model_epoch = {}
    for i in sample:
        group = groups[i]
        shape = rw.model_shape(data[0].shape[-1], group, how)
        chunk = rw.models_per_chunk(shape, group["batch_size"], int(data[1].max()), chunk_params, 1e8)
        models = min(len(group["variants"]) * n_folds, chunk)
        splits, jobs = trial_jobs(labels, group, models)
        seconds = run_batched(data, labels, shape, mode, group, splits, jobs, epochs=1)
        per_model_epoch[i] = seconds[KEY] / len(jobs)
        print(f"  {dataset} {shape_name(shape)}: "
              f"{len(jobs)} models, {1e3 * seconds['cpu'] / len(jobs):.1f} ms CPU "
              f"({1e3 * seconds['wall'] / len(jobs):.1f} ms wall) per model-epoch", flush=True)
    total = 0.0
    for i, group in enumerate(groups):  # unsampled shapes: mean of sampled shapes of the same pooling size
        if i in per_model_epoch:
            t = per_model_epoch[i]
        else:
            same = [per_model_epoch[j] for j in per_model_epoch
                    if cost_key(groups[j], how)[0] == cost_key(group, how)[0]]
            t = float(np.mean(same)) if same else float(np.mean(list(per_model_epoch.values())))
        total += t * len(group["variants"]) * n_folds * n_seeds * epochs_full
    small = [i for i, g in enumerate(groups) if (g["emb_dims"], g["emb_layers"], g["hidden_dim"], g["n_heads"])
             == (32, 1, 16, 8)]
    small_s = (per_model_epoch[small[0]] * len(rw.search_configs("small", 0, 0)) * n_folds * n_seeds
               * epochs_full / parallel) if small and small[0] in per_model_epoch else None
    return {"dataset": dataset, "pool_width": how, "sampled_shapes": len(sample), "of_shapes": len(groups),
            "extrapolated_small_search_s": small_s, "pooling_sizes": sizes,
            "extrapolated_full_protocol_s": total / parallel,
            "trainings": sum(len(g["variants"]) for g in groups) * n_folds * n_seeds}


def _median_seconds(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[repeats // 2]


def grid_work(dataset: str, how: str, batch: int = 4, epochs: int = 50, n_folds: int = 10, n_seeds: int = 5,
              val_fraction: float = 0.2) -> dict:
    """Work of the full Hu et al. grid on a dataset, counted: model steps, parameter-element steps
    (what AdamW touches) and forward+backward FLOPs (layer 0: 2x its forward, the rest 3x; per step
    B bags of the mean real / padded length, the pooling's per-bag order of batched_mil.pool)."""
    data, labels = load(dataset)
    padded, lengths, _ = data
    d_in = padded.shape[-1]
    steps, n_pad, n_real = [], [], []
    rng = np.random.default_rng(0)
    for seed in range(n_seeds):
        for split in rw.cv_splits(labels.numpy(), n_folds, seed, val_fraction):
            steps.append(math.ceil(len(split["train"]) / batch))
            for _ in range(20):
                order = rng.permutation(split["train"])
                for i in range(0, len(order), batch):
                    n_pad.append(int(lengths[order[i:i + batch]].max()))
                    n_real.append(float(lengths[order[i:i + batch]].double().mean()))
    groups = rw.group_by_shape(rw.search_configs("hu", 0, 0))
    steps_per_epoch = float(np.mean(steps))
    elements, flops, model_steps = 0.0, {"real": 0.0, "padded": 0.0}, 0.0
    for group in groups:
        per_shape = len(group["variants"]) * n_folds * n_seeds * epochs * steps_per_epoch
        s = rw.model_shape(d_in, group, how)
        n_params = sum(q.numel() for q in bm.reference_model(s, "softmax", 1.0, 0.0).parameters())
        e, w, h, d = s.emb_dims, s.width, s.n_heads, s.d_head
        enc0, enc_rest = d_in * e, (s.emb_layers - 1) * e * e + (w * e if s.emb_proj else 0)
        pool = 2 * (w * h * d * 2 + batch * h * w * d * 2 + batch * w)
        for key, n in (("padded", float(np.mean(n_pad))), ("real", float(np.mean(n_real)))):
            per_instance = 2 * batch * n * (enc0 + enc_rest) + 2 * batch * n * w * h * 2
            first = 2 * batch * n * enc0
            flops[key] += (2 * first + 3 * (per_instance - first + pool)) * per_shape
        elements += n_params * per_shape
        model_steps += per_shape
    return {"dataset": dataset, "pool_width": how, "steps_per_epoch": steps_per_epoch,
            "mean_bag_len": float(np.mean(n_real)), "mean_padded_bag_len": float(np.mean(n_pad)),
            "model_steps": model_steps, "param_element_steps": elements, "fwd_bwd_flops": flops}


def machine_rates(d_in: int, n_inst: int) -> dict:
    """Measured (1 thread, process time): batched-matmul GFLOP/s at the encoder's shape, and the
    fused AdamW kernel's bytes/s (28 B per element: read p, g, m, v; write p, m, v) with a DRAM-sized
    and a cache-sized working set."""
    x, weight = torch.randn(24, n_inst, d_in), torch.randn(24, d_in, 64)
    rates = {"bmm_gflops": 2 * 24 * n_inst * d_in * 64 / _median_seconds(lambda: torch.bmm(x, weight)) / 1e9}
    for label, (m, n) in (("dram", (12, 425_985)), ("cache", (2, 85_697))):
        p, g, mom, var = (np.random.rand(m, n).astype(np.float32) for _ in range(4))
        one = np.ones(m, np.float32)
        consts = np.array([0.1, 0.999, 0.001, 1e-8], np.float32)
        step = lambda: bm._adamw_update(p, g, mom, var, one, one, -1e-3 * one, 0.3 * one,  # noqa: E731
                                        np.ones(m, bool), consts)
        step()
        rates[f"adamw_GBps_{label}"] = ADAMW_BYTES_PER_ELEMENT * m * n / _median_seconds(step) / 1e9
    return rates


def lower_bound(dataset: str, how: str, parallel: int) -> dict:
    """Floor of the full grid's time on ``parallel`` cores at the measured rates: optimizer traffic
    (28 B per parameter element per step) / AdamW bandwidth + forward/backward FLOPs / GFLOP/s."""
    work = grid_work(dataset, how)
    rates = machine_rates(int(load(dataset)[0][0].shape[-1]), int(4 * round(work["mean_padded_bag_len"])))
    optimizer_s = ADAMW_BYTES_PER_ELEMENT * work["param_element_steps"] / (rates["adamw_GBps_dram"] * 1e9) / parallel
    optimizer_cache_s = ADAMW_BYTES_PER_ELEMENT * work["param_element_steps"] / (rates["adamw_GBps_cache"] * 1e9) / parallel
    compute_s = work["fwd_bwd_flops"]["real"] / (rates["bmm_gflops"] * 1e9) / parallel
    return {**work, **rates, "optimizer_floor_s": optimizer_s, "optimizer_floor_cache_s": optimizer_cache_s,
            "fwd_bwd_floor_s": compute_s, "floor_s": compute_s + optimizer_cache_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="fox", help="comma-separated datasets for the extrapolation")
    parser.add_argument("--mode", default="sparsemax")
    parser.add_argument("--models", type=int, default=24, help="K configs trained in part 1")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per training in part 1")
    parser.add_argument("--pool_width", default="per_head", choices=("per_head", "total"))
    parser.add_argument("--ratio_shapes", type=int, default=3,
                        help="shapes in part 1 (E32 L1 d16, E64 L2 d32, E128 L1 d64; 8 heads)")
    parser.add_argument("--shapes", type=int, default=36, help="shapes timed per dataset in part 2")
    parser.add_argument("--parallel", type=int, default=2, help="trials in parallel (cores) for part 2")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="cpu: process CPU seconds (fair on a shared machine), wall: elapsed seconds")
    parser.add_argument("--chunk_params", type=float, default=3e6)
    parser.add_argument("--skip_ratio", action="store_true")
    parser.add_argument("--skip_extrapolation", action="store_true")
    parser.add_argument("--lower_bound", action="store_true",
                        help="part 3: count the full grid's work and divide by measured rates (a floor)")
    parser.add_argument("--quick", action="store_true", help="8 models, 1 epoch, 1 shape, 3 shapes extrapolated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one per core as in a trial)")
    parser.add_argument("--out_dir", default=None, help="default results/bench (--quick: results/quick/bench)")
    parser.add_argument("--report", action="store_true",
                        help="only write the README block bench_real_world from the committed results/bench/ runs")
    args = parser.parse_args(argv)
    if args.report:
        write_block("bench_real_world", committed_report())
        return {}
    if args.quick:
        args.models, args.epochs, args.shapes = 8, 1, 3
    args.out_dir = args.out_dir or str(training.REPO_DIR / "results" / ("quick/bench" if args.quick else "bench"))
    global KEY
    KEY = args.clock
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    training.log_config(args)
    result: dict = {"config": vars(args)}
    shapes = [g for g in rw.group_by_shape(rw.search_configs("hu", 0, 0))
              if (g["emb_dims"], g["emb_layers"], g["hidden_dim"]) in ((32, 1, 16), (64, 2, 32), (128, 1, 64))
              and g["n_heads"] == 8]
    shapes = shapes[:1 if args.quick else args.ratio_shapes]
    if not args.skip_ratio:
        print(f"part 1 (measured, clock={args.clock}): {args.models} trainings of {args.epochs} epochs, fox, "
              f"mode {args.mode}")
        rows = ratio_table("fox", args.mode, args.models, args.epochs, args.pool_width, shapes)
        result["ratios"] = rows
        print("\n| shape | models | reference /s | batched M=1 /s | batched /s | x vs reference | x vs M=1 |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['models']} | {r['reference_per_s']:.3f} | {r['batched_M1_per_s']:.3f} | "
                  f"{r['batched_per_s']:.3f} | {r['speedup_vs_reference']:.1f} | {r['speedup_vs_M1']:.1f} |")
    if not args.skip_extrapolation:
        print(f"\npart 2 (EXTRAPOLATED from one timed epoch per sampled shape), pool_width={args.pool_width}, "
              f"clock={args.clock}")
        result["extrapolation"] = [extrapolate(d, args.mode, args.pool_width, args.shapes, args.parallel,
                                               args.chunk_params) for d in args.datasets.split(",")]
        print("\n| dataset | --search small (200 trainings) | full grid (43,200 trainings) | shapes timed |")
        print("|---|---|---|---|")
        for e in result["extrapolation"]:
            small = e["extrapolated_small_search_s"]
            print(f"| {e['dataset']} | {f'{small / 60:.1f} min (extrapolated)' if small else '–'} | "
                  f"{e['extrapolated_full_protocol_s'] / 3600:.1f} h (extrapolated) | "
                  f"{e['sampled_shapes']}/{e['of_shapes']} |")
    if args.lower_bound:
        result["lower_bound"] = [lower_bound(d, args.pool_width, args.parallel) for d in args.datasets.split(",")]
        for b in result["lower_bound"]:
            print(f"\npart 3 ({b['dataset']}, {args.pool_width}): {b['model_steps']:.3g} model steps, "
                  f"{b['param_element_steps']:.3g} parameter-element steps, {b['fwd_bwd_flops']['real']:.3g} FLOPs; "
                  f"measured {b['bmm_gflops']:.0f} GFLOP/s, AdamW {b['adamw_GBps_dram']:.0f} GB/s (DRAM) / "
                  f"{b['adamw_GBps_cache']:.0f} GB/s (cache); floor on {args.parallel} cores: fwd+bwd "
                  f"{b['fwd_bwd_floor_s'] / 60:.0f} min + optimizer {b['optimizer_floor_cache_s'] / 60:.0f} min "
                  f"(cache-resident; {b['optimizer_floor_s'] / 60:.0f} min from DRAM) = {b['floor_s'] / 3600:.1f} h")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_real_world_{args.pool_width}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    if result.get("ratios"):
        with (out / f"bench_real_world_{args.pool_width}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(result["ratios"][0]))
            writer.writeheader()
            writer.writerows(result["ratios"])
    print(f"wrote {path}")
    return result


def extrapolation_table(rows: list[dict]) -> list[str]:
    """Part 2: the full grid's extrapolated hours per dataset and how many of its shapes were timed."""
    lines = ["| dataset | full grid (extrapolated, h) | shapes timed |", "|---|---|---|"]
    return lines + [f"| {r['dataset']} | {r['extrapolated_full_protocol_s'] / 3600:.1f} | "
                    f"{r['sampled_shapes']} of {r['of_shapes']} |" for r in rows]


def ratio_line(rows: list[dict]) -> str:
    """Part 1: batched trainer vs the same configs one by one, per shape."""
    speedups = ", ".join(f"{r['speedup_vs_reference']:.1f}x ({r['shape']})" for r in rows)
    return (f"Batched training vs the same {rows[0]['models']} configs one by one (`layers.HopfieldPooling` + "
            f"`torch.optim.AdamW`), {rows[0]['dataset']}, {rows[0]['epochs']} epoch(s): {speedups} "
            f"(`{training.repo_relative(RATIOS)}`).")


def floor_line(bound: dict, parallel: int, extrapolated_s: float) -> str:
    """Part 3: the counted work of the full grid, the measured rates, and the floor they give."""
    adamw_bytes = ADAMW_BYTES_PER_ELEMENT * bound["param_element_steps"]
    return (f"Floor of the {bound['dataset']} full grid on {parallel} cores (part 3, counted work / measured rates): "
            f"{bound['model_steps'] / 1e6:.1f} M model steps over {bound['param_element_steps']:.3g} parameter-element "
            f"steps ({bound['param_element_steps'] / bound['model_steps'] / 1e3:.0f}k parameters per model on "
            f"average); a single-pass AdamW moves {adamw_bytes:.2g} bytes "
            f"({bound['optimizer_floor_cache_s'] / 60:.0f} min at {bound['adamw_GBps_cache']:.0f} GB/s per core "
            f"with a cache-resident working set, {bound['optimizer_floor_s'] / 60:.0f} min from DRAM at "
            f"{bound['adamw_GBps_dram']:.0f} GB/s), forward+backward need {bound['fwd_bwd_flops']['real']:.2g} FLOPs "
            f"({bound['fwd_bwd_floor_s'] / 60:.0f} min at {bound['bmm_gflops']:.0f} GFLOP/s per core, the encoder's "
            f"batched matmul): a floor of {bound['floor_s'] / 3600:.1f} h before any per-step overhead; the "
            f"extrapolated plain grid is {extrapolated_s / bound['floor_s']:.1f}x that floor.")


def markdown(result: dict, ratios: list[dict]) -> str:
    """The README block: part 2's extrapolation for every dataset, part 1's speed-ups, part 3's floor."""
    parts = result["extrapolation"]
    config = next(iter(result["configs"].values()))
    parallel = config["parallel"]
    fox = next(e for e in parts if e["dataset"] == result["lower_bound"][0]["dataset"])
    head = (f"Plain protocol (no early stopping or halving), full grid = {parts[0]['trainings']:,} trainings, "
            f"{parallel} trials in parallel, EXTRAPOLATED from one timed epoch per sampled shape ({config['clock']} "
            f"clock, {config['threads']} thread(s) per trial; `{training.repo_relative(ALL_DATASETS)}`):")
    return "\n".join([head, "", *extrapolation_table(parts), "", ratio_line(ratios), "",
                      floor_line(result["lower_bound"][0], parallel, fox["extrapolated_full_protocol_s"])])


def committed_report() -> str:
    """The README block ``bench_real_world``, from the committed runs under results/bench/."""
    return markdown(json.loads(ALL_DATASETS.read_text()), json.loads(RATIOS.read_text())["ratios"])


if __name__ == "__main__":
    main()
