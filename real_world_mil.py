"""Real-world multiple-instance-learning benchmark (Ramsauer et al. 2021, Table 1; Hu et al. 2023).

    python3 real_world_mil.py --dataset fox --mode sparse           # full protocol, grid of Hu et al.
    python3 real_world_mil.py --dataset fox --mode all --search small
    python3 real_world_mil.py --dataset fox --mode sparse --search ramsauer --num_samples 64
    python3 real_world_mil.py --report                              # table + plot from result files

Model (per bag): instance MLP embedding -> HopfieldPooling (one learned query) -> classifier,
i.e. ``batched_mil.reference_model`` (a ``training.BagClassifier``); trained with AdamW (weight decay
1e-4), gradient clipping 1.0, batch 4, lr multiplied by ``lr_decay`` after each epoch, 50 epochs.

Protocol (nested, no test data in any choice):
  for each of ``--n_seeds`` repetitions r (seed = --seed + r, a different split each):
    outer stratified ``--n_folds``-fold CV; for each outer fold:
      the training part is split (stratified) into inner-train and validation (``--val_fraction``);
      every config of the search space is trained on inner-train; after each epoch it is evaluated
      on validation (and, for the record only, on the outer test fold);
      best epoch of a config = max validation AUC (ties: lower validation loss, then earlier);
      chosen config = the one with the best validation AUC at its best epoch (same tie rule);
      reported = the chosen config's test AUC / accuracy *at its best-validation epoch*.
    repetition score = mean over the folds. Reported: mean +- std over repetitions (AUC x 100).
  Features are standardized with the mean/std of the inner-train instances of each fold.

Heads and widths: Hu et al.'s ``real_world_mil.py`` builds ``Hopfield(d_model=emb_dims,
n_heads, d_keys=hid_dim, d_values=hid_dim)`` on the output of the embedding MLP, i.e. ``hidden_dim``
is the width *per head*. We follow it (``--pool_width per_head``, default):
``HopfieldPooling(d_model=emb_dims, n_heads, head_dim=hidden_dim)`` reads the embedding MLP's
emb_dims-wide output directly (q/k/v: emb_dims -> n_heads * hidden_dim, W_O back to emb_dims).
``--pool_width total`` instead uses hidden_dim as the total pooling width, rounded up to a multiple
of n_heads, after an extra Linear(emb_dims -> width) (cheaper, not Hu et al.'s structure).

Differences to Hu et al.'s code (commit 051e70c of MAGICS-LAB/SparseModernHopfield): their model is
emb -> Hopfield -> ReLU -> Linear with the value projection applied to the projected keys; ours is
``training.BagClassifier`` (LayerNorm, HopfieldPooling of ``layers.py`` with values projected from the
stored patterns, GELU, LayerNorm, Linear). Their protocol tuned on outer fold 0 and reused that config
for the other folds, early-stopped on a noisy criterion, and (in that commit) their ``HopfieldCore``
applied ``torch.softmax`` whatever the mode; here the map is ``sparsemax.get_map(mode)``.

--search ramsauer: Ramsauer et al. (2021)'s own MIL search space (their Table A.2), ``RAMSAUER_GRID``,
19,440 configs, of which ``--num_samples`` are drawn uniformly without replacement (``--seed``), default
``--epochs 160`` (explicit ``--epochs`` wins; ``--quick`` keeps its 2). Their MIL experiment code is not
public: github.com/ml-jku/hopfield-layers (HEAD f56f929) holds the ``hflayers`` package and three demo
notebooks (bit_pattern, latch_sequence, mnist_bags), no Tiger/Fox/Elephant/UCSB script. The mapping
follows the table, the ``hflayers.HopfieldPooling`` arguments it names, and Hu et al.'s hflayers-based
``real_world_mil.py`` (Hibb-bb/sparse_hopfield@85939b0: ``Hopfield(input_size=emb_dims, num_heads,
hidden_size=hid_dim, scaling, dropout)``; MAGICS-LAB/SparseModernHopfield@051e70c the same on its own
layer), whose 864-config grid is a subset of Table A.2 under exactly this reading (their emb_dims
{32, 64, 128} = "hidden dims", hid_dim {16, 32, 64} = "head dims"):

    Table A.2              values                     ours (RAMSAUER_GRID key -> model)
    learning rates         {1e-3, 1e-5}               lr (AdamW)
    lr decay               {0.98, 0.96, 0.94}         lr_decay: lr *= decay after each epoch
    embedding layers       {1, 2, 3}                  emb_layers: number of [Linear, ReLU] instance layers
    layer widths           {32, 64, 256, 1024, 2048}  emb_dims: width of each of those layers
    hidden dims            {32, 64, 128}              hidden_dim: width the pooling reads and returns,
                                                      d_model = hflayers input_size (Hu et al.'s emb_dims),
                                                      via a final Linear(emb_dims -> hidden_dim)
    heads                  {8, 12, 16, 32}            n_heads
    head dims              {16, 32, 64}               head_dim: q/k/v width per head = hflayers hidden_size
                                                      ("depth of the association space", passed as
                                                      HopfieldCore(head_dim=hidden_size), hflayers/__init__.py:99,
                                                      activation.py:110-114; Hu et al.'s hid_dim)
    scaling (beta)         {0.1, 1, 10}               scale
    bag dropout            {0, 0.75}                  bag_dropout: in training each instance embedding is
                                                      zeroed whole with this rate, the kept ones x 1/(1 - rate),
                                                      before the pooling (and its LayerNorm): nn.Dropout2d on
                                                      (bag, instance, feature), as the ``bag_dropout =
                                                      nn.Dropout2d(p=0.75)`` in front of HopfieldPooling in an
                                                      hflayers-based Fox/Tiger/Elephant script of the same
                                                      lineage (sparse_hflayers imports; defined, its call
                                                      commented out). Hu et al.'s released grids put
                                                      {0, 0.75} into the association dropout instead (our
                                                      ``dropout``, as in --search hu)
    epochs                 160                        --epochs default
    (not in the table)                                dropout (attention) 0 (hflayers' default), batch 4,
                                                      AdamW weight decay 1e-4, clipping 1.0, --patience /
                                                      --halving_rungs as for every search (off: 0 / none)

Model of this search (``POOLING["ramsauer"]``): emb_layers x [Linear(emb_dims), ReLU] -> Linear(hidden_dim)
-> bag dropout -> LayerNorm -> HopfieldPooling(d_model=hidden_dim, n_heads, head_dim) -> GELU -> LayerNorm
-> Linear. Unknown from any public source, hence our choices: batch size, early stopping (the table only
says 160 epochs), whether the widths of the embedding layers varied per layer (here: one width for all),
and the last embedding layer (here linear, Hu et al.'s ends with ReLU); hflayers' pooling also has
separate per-head value widths (pattern_size), here equal to head_dim.

Speed: configs of equal shape (emb_dims, emb_layers, width, heads, batch) are trained together with
all folds as one batched model (``batched_mil.py``); one Ray trial = one shape x one repetition,
with lr, lr decay, scale, dropout and the fold varying along the model axis.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.stats
import torch

import batched_mil
import sparsemax
import training

DATASETS = ("fox", "tiger", "elephant", "ucsb", "musk1", "musk2")
MODE_ALIASES = {"sparse": "sparsemax", "standard": "softmax"}  # names of Hu et al.
MODES = ("sparse", "standard") + tuple(sparsemax.MODES)
ALL_MODES = ("sparse", "standard") + tuple(m for m in sparsemax.MODES if m not in MODE_ALIASES.values())
MAP_PARAMS = {"entmax_alpha": ("alpha",), "gsh": ("alpha",), "normmax": ("alpha",),
              "k_subsets": ("k",), "sequential_k_subsets": ("k",)}  # the map parameters --alpha / --k set
# Ramsauer et al. 2021, Table 1 (AUC x 100, Hopfield pooling): mean, std
PUBLISHED_AUC = {"tiger": (91.3, 0.5), "fox": (64.05, 0.4), "elephant": (94.9, 0.3), "ucsb": (89.5, 0.8)}

SHAPE_KEYS = ("emb_dims", "emb_layers", "hidden_dim", "n_heads", "batch_size")
VARIANT_KEYS = ("lr", "lr_decay", "scale", "dropout")
# keys only the ramsauer space has (absent from the other searches' configs, trial files and results)
EXTRA_SHAPE_KEYS = ("head_dim",)
EXTRA_VARIANT_KEYS = ("bag_dropout",)
# Hu et al.'s grid (their real_world_mil.py): 864 configs
HU_GRID = {"lr": [1e-3, 1e-5], "lr_decay": [0.98, 0.96, 0.94], "batch_size": [4],
           "emb_dims": [32, 64, 128], "emb_layers": [1, 2], "hidden_dim": [16, 32, 64],
           "n_heads": [8, 12], "scale": [0.1, 10.0], "dropout": [0.0, 0.75]}
# --search small: the cheapest architecture of the grid, its better lr and slowest decay, and the
# two most influential knobs of the pooling (scale beta, dropout) in full: 4 configs, one shape.
SMALL_GRID = {**HU_GRID, "lr": [1e-3], "lr_decay": [0.98], "emb_dims": [32], "emb_layers": [1],
              "hidden_dim": [16], "n_heads": [8]}
# --quick: a seconds-long smoke setting
QUICK_GRID = {**SMALL_GRID, "hidden_dim": [2], "emb_dims": [8], "dropout": [0.0]}
# Ramsauer et al. 2021, Table A.2 (their MIL search space), in our names (mapping: module docstring):
# 2 * 3 * 3 * 5 * 4 * 3 * 3 * 3 * 2 = 19,440 configs; --search ramsauer samples --num_samples of them.
RAMSAUER_GRID = {"lr": [1e-3, 1e-5], "lr_decay": [0.98, 0.96, 0.94], "batch_size": [4],
                 "emb_layers": [1, 2, 3], "emb_dims": [32, 64, 256, 1024, 2048], "n_heads": [8, 12, 16, 32],
                 "head_dim": [16, 32, 64], "scale": [0.1, 1.0, 10.0], "hidden_dim": [32, 64, 128],
                 "dropout": [0.0], "bag_dropout": [0.0, 0.75]}
RAMSAUER_EPOCHS = 160  # Table A.2; the default --epochs of --search ramsauer (explicit --epochs wins)
SEARCHES = ("hu", "small", "random", "quick", "ramsauer")
SAMPLED_SEARCHES = ("random", "ramsauer")  # --num_samples configs drawn from a space
DEFAULT_NUM_SAMPLES = 32


# --------------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------------
def grid_configs(grid: dict[str, list]) -> list[dict]:
    """All combinations of a grid, in a fixed order."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def search_configs(search: str, num_samples: int, seed: int) -> list[dict]:
    """Configs of ``--search``: hu (full grid), small, quick, random (``num_samples`` distinct configs
    drawn uniformly from the Hu et al. grid) or ramsauer (the same from Ramsauer et al.'s Table A.2
    space, ``RAMSAUER_GRID``); samples are drawn up front, deterministic in ``seed``, so equal shapes batch."""
    if search in SAMPLED_SEARCHES:
        configs = grid_configs(HU_GRID if search == "random" else RAMSAUER_GRID)
        if num_samples > len(configs):
            raise ValueError(f"--num_samples {num_samples}: --search {search} has only {len(configs)} configs")
        pick = np.random.default_rng(seed).choice(len(configs), size=num_samples, replace=False)
        return [configs[i] for i in sorted(pick)]
    return grid_configs({"hu": HU_GRID, "small": SMALL_GRID, "quick": QUICK_GRID}[search])


def pool_width(hidden_dim: int, n_heads: int, how: str) -> int:
    """Width of the heads' association space n_heads * head_dim: hidden_dim per head (Hu et al.) or
    hidden_dim in total, rounded up to a multiple of n_heads."""
    if how == "per_head":
        return hidden_dim * n_heads
    return int(math.ceil(hidden_dim / n_heads)) * n_heads


# the model structure of each --pool_width (recorded in the results; part of the Ray experiment name)
POOLING = {"per_head": "MLP(emb_dims) -> HopfieldPooling(d_model=emb_dims, n_heads, head_dim=hidden_dim)",
           "total": "MLP(emb_dims) -> Linear(w) -> HopfieldPooling(d_model=w, n_heads), "
                    "w = hidden_dim rounded up to a multiple of n_heads",
           "ramsauer": "MLP(emb_dims) -> Linear(hidden_dim) -> bag dropout -> HopfieldPooling(d_model=hidden_dim, "
                       "n_heads, head_dim)"}
# what --search ramsauer's bag_dropout does (recorded in its protocol only)
BAG_DROPOUT = ("training only: each instance embedding (pooling input, before its LayerNorm) zeroed whole with "
               "rate bag_dropout, kept ones x 1/(1 - rate); nn.Dropout2d over (bag, instance, feature)")


def model_shape(d_in: int, group: dict, how: str) -> batched_mil.Shape:
    """Architecture of a shape group. per_head (Hu et al.): HopfieldPooling(d_model=emb_dims, n_heads,
    head_dim=hidden_dim) on the embedding MLP's output; total: Linear(emb_dims -> w) then
    HopfieldPooling(d_model=w, n_heads) with w = ``pool_width(hidden_dim, n_heads, "total")``;
    ramsauer (--search ramsauer): Linear(emb_dims -> hidden_dim) then HopfieldPooling(d_model=hidden_dim,
    n_heads, head_dim)."""
    if how == "ramsauer":
        return batched_mil.Shape(d_in, group["emb_dims"], group["emb_layers"], group["hidden_dim"], group["n_heads"],
                                 head_dim=group["head_dim"], emb_proj=True)
    if how == "per_head":
        return batched_mil.Shape(d_in, group["emb_dims"], group["emb_layers"], group["emb_dims"], group["n_heads"],
                                 head_dim=group["hidden_dim"], emb_proj=False)
    width = pool_width(group["hidden_dim"], group["n_heads"], how)
    return batched_mil.Shape(d_in, group["emb_dims"], group["emb_layers"], width, group["n_heads"])


def group_by_shape(configs: Sequence[dict]) -> list[dict]:
    """Configs -> groups ``{shape keys..., "variants": [{lr, lr_decay, scale, dropout}, ...]}`` (plus
    head_dim / bag_dropout where the configs have them: --search ramsauer)."""
    groups: dict[tuple, dict] = {}
    for config in configs:
        shape_keys = SHAPE_KEYS + tuple(k for k in EXTRA_SHAPE_KEYS if k in config)
        key = tuple(config[k] for k in shape_keys)
        group = groups.setdefault(key, {**{k: config[k] for k in shape_keys}, "variants": []})
        group["variants"].append({k: config[k] for k in VARIANT_KEYS + EXTRA_VARIANT_KEYS if k in config})
    return list(groups.values())


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------
def stratified_folds(labels: np.ndarray, n_folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Partition indices into ``n_folds`` test folds; each class is shuffled and dealt round-robin
    (continuing across classes), so class counts per fold differ by at most one."""
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    position = 0
    for label in np.unique(labels):
        for index in rng.permutation(np.flatnonzero(labels == label)):
            folds[position % n_folds].append(int(index))
            position += 1
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def stratified_holdout(indices: np.ndarray, labels: np.ndarray, fraction: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (train, validation) with round(fraction * n_c) validation bags per class
    (at least one when the class has two or more)."""
    train, val = [], []
    for label in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == label])
        n_val = int(round(fraction * len(members)))
        n_val = max(n_val, 1) if len(members) >= 2 else 0
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def cv_splits(labels: Sequence[int], n_folds: int, seed: int, val_fraction: float) -> list[dict]:
    """Outer stratified folds of repetition ``seed`` with an inner stratified validation split of each
    fold's training part: ``[{"train", "val", "test"}]`` index arrays (disjoint, union = all bags)."""
    labels = np.asarray(labels)
    if min(np.bincount(labels)) < n_folds:
        raise ValueError(f"n_folds={n_folds} exceeds the size of the smallest class")
    tests = stratified_folds(labels, n_folds, np.random.default_rng([seed, 0]))
    splits = []
    for fold, test in enumerate(tests):
        rest = np.setdiff1d(np.arange(len(labels)), test)
        train, val = stratified_holdout(rest, labels, val_fraction, np.random.default_rng([seed, 1, fold]))
        splits.append({"train": train, "val": val, "test": test})
    return splits


# --------------------------------------------------------------------------------------------------
# One Ray trial: one shape x one repetition, all folds and variants batched
# --------------------------------------------------------------------------------------------------
def _stable_seed(*parts: Any) -> int:
    return zlib.crc32(json.dumps(parts, sort_keys=True, default=str).encode())


def _standardization(padded: torch.Tensor, lengths: torch.Tensor, bags: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (std 0 -> 1) of all instances of ``bags``."""
    x = torch.cat([padded[b, :lengths[b]] for b in bags])
    std = x.std(0)
    return x.mean(0), torch.where(std > 0, std, torch.ones_like(std))


CHUNK_PARAMS, CHUNK_ACTIVATIONS = 3e6, 1e8  # defaults of --chunk_params / --chunk_activations
BAG_LAYOUTS = ("auto", "padded", "ragged")
RAGGED_FROM = 4.0  # --bag_layout auto: ragged where the longest bag holds this many times the mean bag's instances


def auto_bag_layout(bags: list) -> str:
    """ragged where padding dominates a padded batch (longest bag / mean bag >= ``RAGGED_FROM``: Musk1 7.7,
    Musk2 16.1; Fox, Tiger, Elephant, UCSB <= 2.2), else padded (``batched_mil.RaggedBagGatherer``)."""
    lengths = np.array([len(x) for x, _ in bags])
    return "ragged" if lengths.max() >= RAGGED_FROM * lengths.mean() else "padded"


def models_per_chunk(shape: batched_mil.Shape, batch_size: int, max_bag: int, chunk_params: float,
                     chunk_activations: float) -> int:
    """Models trained at once: bounded by parameters (x4 with grads and Adam moments) and by the
    activations of one step on padded bags."""
    per_model = sum(p.numel() for p in batched_mil.reference_model(shape, "softmax", 1.0, 0.0).parameters())
    activations = batch_size * max_bag * (shape.d_in + shape.emb_layers * shape.emb_dims + 3 * shape.width
                                          + shape.n_heads) * 4
    return max(1, int(min(chunk_params / per_model, chunk_activations / activations)))


def train_group(config: dict, report: Any = None, bags: list | None = None) -> list[dict]:
    """Train every (fold, variant) model of a shape group for one repetition; one record per model
    with its best-validation epoch and the metrics there. ``report`` gets progress dicts; ``bags``: the
    dataset (default: loaded from the embedded files)."""
    device = training.trial_device(config)  # also caps torch threads to cpus_per_trial
    bags = bags if bags is not None else training_data(config["dataset"])
    padded, lengths, pad = batched_mil.pad_dataset([torch.from_numpy(np.array(x)) for x, _ in bags])
    labels = torch.tensor([y for _, y in bags])
    group, seed = config["group"], config["seed"]
    splits = cv_splits(labels.numpy(), config["n_folds"], seed, config["val_fraction"])
    shape = model_shape(padded.shape[-1], group, config["pool_width"])
    jobs = [(fold, v) for fold in range(len(splits)) for v in range(len(group["variants"]))]
    chunk = models_per_chunk(shape, group["batch_size"], int(lengths.max()), config["chunk_params"],
                             config["chunk_activations"])
    stats = [_standardization(padded, lengths, s["train"]) for s in splits]
    records = []
    size = chunk_size(len(jobs), len(group["variants"]), chunk)
    stopping = batched_mil.Stopping(patience=config["patience"], rungs=tuple(config["halving_rungs"]),
                                    keep=config["halving_keep"])
    for start in range(0, len(jobs), size):
        part = jobs[start:start + size]
        gens = [torch.Generator().manual_seed(_stable_seed(seed, fold, v, group, config["mode"]))
                for fold, v in part]
        history = fit_models(config, shape, (padded, lengths, pad), labels, [group["variants"][v] for _, v in part],
                             gens, train_sets=[splits[f]["train"].tolist() for f, _ in part],
                             eval_sets={"val": [splits[f]["val"].tolist() for f, _ in part],
                                        "test": [splits[f]["test"].tolist() for f, _ in part]},
                             standardize=[stats[f] for f, _ in part], batch_size=group["batch_size"],
                             epochs=config["epochs"], stopping=stopping, groups=torch.tensor([f for f, _ in part]),
                             device=device)
        best = batched_mil.best_epoch(history["val_auc"], history["val_loss"])
        trained = (~torch.isnan(history["val_loss"])).sum(0)
        for i, (fold, v) in enumerate(part):
            at = {k: float(h[best[i], i]) for k, h in history.items()}
            records.append({"seed": seed, "fold": fold, "variant": v, "best_epoch": int(best[i]) + 1,
                            "epochs_trained": int(trained[i]),
                            **{k: group[k] for k in SHAPE_KEYS}, **group["variants"][v], "width": shape.width,
                            "head_dim": shape.d_head,
                            **at})
        if report is not None:
            report({"models_done": len(records), "models_total": len(jobs)})
    return records


def fit_models(config: dict, shape: batched_mil.Shape, data: tuple, labels: torch.Tensor, variants: Sequence[dict],
               generators: Sequence[torch.Generator], train_sets: list, eval_sets: dict, standardize: list,
               batch_size: int, epochs: int, stopping: batched_mil.Stopping = batched_mil.Stopping(),
               groups: torch.Tensor | None = None, device: torch.device = torch.device("cpu")) -> dict:
    """Model m (hyperparameters ``variants[m]``, init from ``generators[m]``) trained on ``train_sets[m]``,
    features standardized by ``standardize[m]`` = (mean, std), as one batched model of ``shape`` with the trial
    config's map, weight decay, clipping, precision and bag layout; ``batched_mil.train_batched``'s history, on the CPU."""
    tensor = lambda key: torch.tensor([float(var[key]) for var in variants])  # noqa: E731
    bag_dropout = tensor("bag_dropout") if "bag_dropout" in variants[0] else None
    model = batched_mil.BatchedBagClassifier.initialized(shape, config["mode"], tensor("scale"), tensor("dropout"),
                                                         generators, config["map_params"], bag_dropout=bag_dropout)
    history = batched_mil.train_batched(
        model.to(device), tuple(t.to(device) for t in data), labels, train_sets=train_sets, eval_sets=eval_sets,
        lr=tensor("lr"), lr_decay=tensor("lr_decay"), epochs=epochs, batch_size=batch_size,
        weight_decay=config["weight_decay"], grad_clip=config["grad_clip"], generators=generators,
        standardize=(torch.stack([m for m, _ in standardize]).to(device),
                     torch.stack([s for _, s in standardize]).to(device)),
        stopping=stopping, groups=groups, precision=config["precision"], ragged=config.get("bag_layout") == "ragged")
    return {k: v.cpu() for k, v in history.items()}


def chunk_size(n_jobs: int, n_variants: int, max_models: int) -> int:
    """Models per batched chunk: balanced chunks of at most ``max_models``, made of whole folds (all
    ``n_variants`` configs of a fold train together, so halving ranks a fold's configs against each other)
    when a fold fits."""
    if n_variants <= max_models:
        folds_per_chunk = max_models // n_variants
        n_chunks = math.ceil(n_jobs / n_variants / folds_per_chunk)
        return math.ceil(n_jobs / n_variants / n_chunks) * n_variants
    n_chunks = math.ceil(n_jobs / max_models)
    return math.ceil(n_jobs / n_chunks)


def training_data(name: str, data_dir: str | None = None) -> list:
    import datasets

    return datasets.load_mil_dataset(name, data_dir)


def ray_trainable(config: dict, bags: list) -> None:
    """Ray Tune entry point: progress reports, then a final one carrying the records as JSON."""
    from ray import tune

    records = train_group(config, bags=bags, report=lambda progress: tune.report({**progress, "records": ""})
                          if progress["models_done"] < progress["models_total"] else None)
    tune.report({"models_done": len(records), "models_total": len(records), "records": encode_records(records)})


_RECORD_INTS = ("fold", "variant", "best_epoch", "epochs_trained")
_RECORD_METRICS = ("val_loss", "val_acc", "val_auc", "test_loss", "test_acc", "test_auc")


def encode_records(records: Sequence[dict]) -> str:
    """A trial's records as compact JSON columns (the trial file is committed): what the trial config does
    not already fix, metrics as float32 (their precision)."""
    columns = {k: [int(r[k]) for r in records] for k in _RECORD_INTS}
    columns.update({k: [float(np.float32(r[k])) for r in records] for k in _RECORD_METRICS})
    columns["fixed"] = {k: records[0][k] for k in ("seed", "width", "head_dim")} if records else {}
    return json.dumps(columns, separators=(",", ":"))


def decode_records(text: str, config: dict) -> list[dict]:
    """Inverse of ``encode_records`` with the shape and variant of each record taken from the trial config."""
    columns = json.loads(text)
    group = config["group"]
    n = len(columns["fold"])
    return [{**columns["fixed"], **{k: columns[k][i] for k in _RECORD_INTS + _RECORD_METRICS},
             **{k: group[k] for k in SHAPE_KEYS}, **group["variants"][columns["variant"][i]]} for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Selection and summary
# --------------------------------------------------------------------------------------------------
def _nan_to(value: float, default: float) -> float:
    return default if value is None or math.isnan(value) else value


def _config_key(record: dict) -> tuple:
    """A record's config in grid order: shape, head_dim (in every record; it separates ramsauer shapes,
    elsewhere it is a function of the shape keys), variant."""
    return (*[record[k] for k in SHAPE_KEYS], record.get("head_dim", 0), record["variant"])


def _choice_order(record: dict) -> tuple:
    """Sort key of the validation choice: best validation AUC first, ties by lower validation loss, then the
    first config in grid order."""
    return (-_nan_to(record["val_auc"], -1.0), _nan_to(record["val_loss"], math.inf), _config_key(record))


def select_configs(records: Sequence[dict]) -> list[dict]:
    """Per (seed, fold): the record with the best validation AUC (ties: lower validation loss, then
    the first config in grid order). Only validation metrics enter the choice."""
    chosen: dict[tuple, dict] = {}
    for record in records:
        key = (record["seed"], record["fold"])
        if key not in chosen or _choice_order(record) < _choice_order(chosen[key]):
            chosen[key] = record
    return [chosen[k] for k in sorted(chosen)]


def summarize(chosen: Sequence[dict]) -> dict:
    """Mean over folds per repetition, then mean +- std (ddof 0) over repetitions; AUC and acc x 100."""
    seeds = sorted({r["seed"] for r in chosen})
    per_seed = []
    for seed in seeds:
        rows = [r for r in chosen if r["seed"] == seed]
        per_seed.append({"seed": seed, "auc": 100 * float(np.nanmean([r["test_auc"] for r in rows])),
                         "acc": 100 * float(np.mean([r["test_acc"] for r in rows]))})
    aucs, accs = [s["auc"] for s in per_seed], [s["acc"] for s in per_seed]
    return {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)), "acc_mean": float(np.mean(accs)),
            "acc_std": float(np.std(accs)), "n_seeds": len(seeds), "per_seed": per_seed}


SELECTION_TOP = 10  # the configs with the best validation AUC whose mean test AUC shows how stable the choice is
NEAR_BEST = 0.02  # validation AUC within this of the chosen config's: a near-tie on a split of 36 bags
SELECTION_KEYS = ("chosen_val_auc", "chosen_test_auc", "optimism", "top_test_auc", "median_test_auc",
                  "near_best_configs", "near_best_test_auc", "hindsight_test_auc", "fixed_hindsight_test_auc",
                  "global_hindsight_test_auc", "val_test_spearman")
UNSCALED_SELECTION_KEYS = ("near_best_configs", "val_test_spearman")  # not AUCs: reported as they are
SEARCH_SIZES = (1, 4, 16, 64, 256)  # smaller searches whose expected validation choice the diagnostics report


def expected_choice_test_auc(rows: Sequence[dict], n: int) -> float:
    """Expected test AUC of the validation choice among ``n`` of a fold's N configs drawn uniformly without
    replacement (a smaller search of the same grid), exactly: with the configs in ``_choice_order`` (rank r = 0
    the best), rank r is chosen iff it is drawn and none of the r better ones is,

        E[test AUC] = sum_r C(N-1-r, n-1) / C(N, n) * test_r,

    so n = 1 is the mean config and n = N the chosen one. Configs without a test AUC are left out (weights
    renormalized)."""
    rows = sorted(rows, key=_choice_order)
    total = len(rows)
    if not 1 <= n <= total:
        raise ValueError(f"n={n} configs: choose 1 <= n <= {total} (the fold's configs)")
    weights = np.array([math.comb(total - 1 - r, n - 1) / math.comb(total, n) for r in range(total)])
    test = np.array([r["test_auc"] for r in rows], dtype=float)
    finite = ~np.isnan(test)
    return float(np.sum(weights[finite] * test[finite]) / np.sum(weights[finite])) if finite.any() else math.nan


def _fold_selection(rows: Sequence[dict]) -> dict:
    """One outer fold's configs: what choosing on validation bought (see ``selection_diagnostics``); the
    chosen config is the first in ``_choice_order``, as in ``select_configs``."""
    rows = sorted(rows, key=_choice_order)
    chosen = rows[0]
    val = np.array([_nan_to(r["val_auc"], -1.0) for r in rows])
    test = np.array([r["test_auc"] for r in rows], dtype=float)
    finite = ~np.isnan(test) & (val >= 0)
    near = val >= val[0] - NEAR_BEST - 1e-12
    rho = (scipy.stats.spearmanr(val[finite], test[finite]).statistic
           if finite.sum() >= 3 and np.ptp(val[finite]) > 0 and np.ptp(test[finite]) > 0 else math.nan)
    return {"chosen_val_auc": chosen["val_auc"], "chosen_test_auc": chosen["test_auc"],
            "optimism": chosen["val_auc"] - chosen["test_auc"], "top_test_auc": float(np.nanmean(test[:SELECTION_TOP])),
            "median_test_auc": float(np.nanmedian(test)), "near_best_configs": float(near.sum()),
            "near_best_test_auc": float(np.nanmean(test[near])), "hindsight_test_auc": float(np.nanmax(test)),
            "val_test_spearman": float(rho)}


def _mean_of_finite(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none (rho is undefined for folds of < 3 distinct configs)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def selection_diagnostics(records: Sequence[dict]) -> dict:
    """What the validation choice buys, per outer fold over its configs, then as ``summarize`` does (fold mean
    per repetition, mean +- std over repetitions; AUCs x 100): the chosen config's validation and test AUC
    and their gap (optimism = val - test, the winner's curse of choosing the max of many noisy validation
    scores), the mean test AUC of the ``SELECTION_TOP`` best configs by validation, the median config's test
    AUC (no selection), the number of configs whose validation AUC is within ``NEAR_BEST`` of the chosen one's
    (near-ties the validation split cannot tell apart) and their mean test AUC, the best test AUC in hindsight
    per fold, that of the best single config for all folds of a repetition and that of the one config best over
    all folds of all repetitions (``_best_global_config_aucs``; ceilings chosen on test data, not estimates, the
    last the least inflated by the choice), Spearman's rho between
    validation and test AUC across the configs, and (``by_search_size``) the expected test AUC of the
    validation choice had the search drawn only n of the configs (``expected_choice_test_auc``)."""
    folds: dict[tuple, list[dict]] = {}
    for record in records:
        folds.setdefault((record["seed"], record["fold"]), []).append(record)
    per_fold = {key: _fold_selection(rows) for key, rows in folds.items()}
    seeds = sorted({s for s, _ in per_fold})
    per_seed = {name: [_mean_of_finite([v[name] for (s, _), v in per_fold.items() if s == seed]) for seed in seeds]
                for name in SELECTION_KEYS if name not in ("fixed_hindsight_test_auc", "global_hindsight_test_auc")}
    per_seed["fixed_hindsight_test_auc"] = [_best_fixed_config_auc([r for r in records if r["seed"] == seed])
                                            for seed in seeds]
    per_seed["global_hindsight_test_auc"] = _best_global_config_aucs(records, seeds)
    out = {}
    for name in SELECTION_KEYS:
        values = [(1.0 if name in UNSCALED_SELECTION_KEYS else 100.0) * v for v in per_seed[name]]
        out[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    out["configs_per_fold"] = int(np.median([len(rows) for rows in folds.values()]))
    out["by_search_size"] = {}
    for n in [n for n in SEARCH_SIZES if n < min(len(rows) for rows in folds.values())]:
        values = [100.0 * _mean_of_finite([expected_choice_test_auc(rows, n)
                                           for (s, _), rows in folds.items() if s == seed]) for seed in seeds]
        out["by_search_size"][str(n)] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    return out


def _best_global_config_aucs(records: Sequence[dict], seeds: Sequence[int]) -> list[float]:
    """The config with the best mean over repetitions of its fold-mean test AUC (configs trained in every fold
    of every repetition): its fold-mean test AUC per repetition, in ``seeds`` order (NaN if no config ran
    everywhere)."""
    n_runs = len({(r["seed"], r["fold"]) for r in records})
    by_config: dict[tuple, dict[int, list[float]]] = {}
    for r in records:
        by_config.setdefault(_config_key(r), {}).setdefault(r["seed"], []).append(r["test_auc"])
    complete = {c: [float(np.nanmean(v[s])) for s in seeds] for c, v in by_config.items()
                if sum(map(len, v.values())) == n_runs}
    return max(complete.values(), key=np.mean) if complete else [math.nan] * len(seeds)


def _best_fixed_config_auc(records: Sequence[dict]) -> float:
    """One repetition: max over configs of the config's fold-mean test AUC (configs trained in every fold)."""
    n_folds = len({r["fold"] for r in records})
    by_config: dict[tuple, list[float]] = {}
    for r in records:
        by_config.setdefault(_config_key(r), []).append(r["test_auc"])
    means = [float(np.nanmean(v)) for v in by_config.values() if len(v) == n_folds]
    return max(means) if means else math.nan


def _mean_std_cell(stat: dict, digits: int) -> str:
    return "–" if math.isnan(stat["mean"]) else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


SELECTION_SEARCHES = ("hu", "ramsauer")  # the searches whose selection diagnostics the README tabulates


def _selection_order(result: dict) -> tuple:
    return DATASETS.index(result["dataset"]), _result_map(result), SELECTION_SEARCHES.index(result["protocol"]["search"])


def _selection_label(result: dict) -> str:
    """'fox / sparse' for the full protocol, 'fox / sparse, ramsauer 64' for a sample of Ramsauer et al.'s space."""
    protocol = result["protocol"]
    search = "" if protocol["search"] == "hu" else f", {protocol['search']} {protocol['num_samples']}"
    return f"{result['dataset']} / {_result_map(result)}{search}"


def selection_table(results: Sequence[dict]) -> str:
    """README block ``real_world_selection``: ``selection_diagnostics`` of every full-protocol result and of
    every ``--search ramsauer`` result (the published space, labeled with its sample count)."""
    rows = [r for r in results if r["protocol"]["search"] in SELECTION_SEARCHES and "selection" in r]
    if not rows:
        return ("No full-protocol result yet (`python3 real_world_mil.py --dataset fox --mode sparse`); the table "
                "appears when one is written.")
    names = ("chosen: val AUC", "chosen: test AUC", "optimism (val - test)", f"top {SELECTION_TOP} by val: test AUC",
             "median config: test AUC", f"configs within {100 * NEAR_BEST:.0f} of the chosen val AUC",
             "those configs: test AUC", "best per fold in hindsight: test AUC",
             "best single config in hindsight: test AUC", "best config for all repetitions in hindsight: test AUC",
             "Spearman val/test")
    lines = ["| dataset / mode | configs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in sorted(rows, key=_selection_order):
        sel = r["selection"]
        nan = {"mean": math.nan, "std": math.nan}  # a key a result file predates
        cells = [_mean_std_cell(sel.get(k, nan), digits=2 if k == "val_test_spearman" else 1) for k in SELECTION_KEYS]
        lines.append(f"| {_selection_label(r)} | {sel['configs_per_fold']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", search_size_table(rows)])


def search_size_table(rows: Sequence[dict]) -> str:
    """Expected test AUC of the validation choice among n random configs of the grid, per full-protocol result
    (``selection["by_search_size"]``; the last column is the full search's choice)."""
    lines = ["Expected test AUC of the validation choice had the search drawn n of the configs at random "
             "(`expected_choice_test_auc`; n = 1 is the mean config):", "",
             "| dataset / mode | " + " | ".join(f"n = {n}" for n in SEARCH_SIZES) + " | all configs |",
             "|---|" + "---|" * (len(SEARCH_SIZES) + 1)]
    nan = {"mean": math.nan, "std": math.nan}
    for r in sorted(rows, key=_selection_order):
        sizes = r["selection"].get("by_search_size", {})
        cells = [_mean_std_cell(sizes.get(str(n), nan), 1) for n in SEARCH_SIZES]
        lines.append(f"| {_selection_label(r)} | " + " | ".join(cells)
                     + f" | {_mean_std_cell(r['selection']['chosen_test_auc'], 1)} |")
    return "\n".join(lines)


def explicit_map_params(args: argparse.Namespace, mode: str) -> dict:
    """The map parameters given on the command line (--alpha, --k) that ``mode``'s map takes."""
    return {p: getattr(args, p) for p in MAP_PARAMS.get(MODE_ALIASES.get(mode, mode), ()) if getattr(args, p) is not None}


def map_label(mode: str, map_params: dict) -> str:
    """A result's map as the tables name it: the mode, then its explicit parameters ('normmax alpha=3')."""
    return mode + "".join(f" {name}={value:g}" for name, value in sorted(map_params.items()))


def results_stem(dataset: str, mode: str, search: str, num_samples: int, map_params: dict | None = None) -> str:
    """Name of a run's result files: ``<dataset>_<mode>`` for the published protocol (``--search hu``), else
    suffixed by the search (``fox_sparse_small``, ``fox_sparse_random32``), so that no smaller search
    overwrites the published protocol's result; explicit map parameters follow the mode
    (``fox_normmax_alpha3_small``), so that no run with other parameters overwrites the defaults' result."""
    params = "".join(f"_{name}{value:g}" for name, value in sorted((map_params or {}).items()))
    suffix = {"hu": ""}.get(search, f"_{search}" + (str(num_samples) if search in SAMPLED_SEARCHES else ""))
    return f"{dataset}_{mode}{params}{suffix}"


def refit_path(results_dir: str | Path, stem: str, inner_cv_top: int | None) -> Path:
    """Where ``--refit`` writes: ``<results_dir>/refit/<stem>.json``, or ``<stem>_inner_cv_top<N>.json``."""
    suffix = "" if inner_cv_top is None else f"_inner_cv_top{inner_cv_top}"
    return Path(results_dir) / "refit" / f"{stem}{suffix}.json"


def write_results(path_stem: Path, payload: dict) -> list[Path]:
    """``<stem>.json`` (everything) and ``<stem>.csv`` (one row per seed x fold: chosen config, metrics)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = path_stem.with_suffix(".json"), path_stem.with_suffix(".csv")
    json_path.write_text(json.dumps(payload, indent=1))
    extra = [k for k in EXTRA_VARIANT_KEYS if any(k in r for r in payload["folds"])]  # ramsauer only
    columns = ["seed", "fold", *SHAPE_KEYS, "width", "head_dim", *VARIANT_KEYS, *extra, "best_epoch", "val_auc",
               "val_loss", "test_auc", "test_acc", "test_loss"]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(payload["folds"])
    return [json_path, csv_path]


# --------------------------------------------------------------------------------------------------
# Refit diagnostic: the chosen configs retrained on the whole outer training part
# --------------------------------------------------------------------------------------------------
REFIT_INITS = 3  # init 0 is the protocol's own; the others are fresh, so an arm's score is not one init's luck
REFIT_ARMS = {"inner_train": ("train",), "train_val": ("train", "val")}  # the training bags of each arm


def _protocol_group(protocol: dict, record: dict) -> dict:
    """The shape group (with its variant list) of the protocol's search that trained ``record``."""
    for group in group_by_shape(search_configs(protocol["search"], protocol["num_samples"], protocol["seed"])):
        if all(group[k] == record[k] for k in SHAPE_KEYS + EXTRA_SHAPE_KEYS if k in group):
            return group
    raise ValueError(f"no config of the {protocol['search']!r} search has the shape of the chosen record {record}")


def _diagnostic_inputs(payload: dict, bags: list) -> tuple[dict, tuple, torch.Tensor]:
    """What ``refit_chosen`` and ``inner_cv_choice`` train with: the result's map and training settings (as a
    trial config for ``fit_models``), the padded bags (padded, lengths, pad) and the labels."""
    protocol = payload["protocol"]
    config = {"mode": payload["map"], "map_params": payload["map_params"],
              **{k: protocol[k] for k in ("weight_decay", "grad_clip", "precision")},
              **{k: protocol[k] for k in ("bag_layout",) if k in protocol}}
    data = batched_mil.pad_dataset([torch.from_numpy(np.array(x)) for x, _ in bags])
    return config, data, torch.tensor([y for _, y in bags])


def _shape_chunks(by_group: dict[str, list], protocol: dict,
                  data: tuple) -> Iterator[tuple[dict, batched_mil.Shape, list]]:
    """(group, shape, chunk of jobs) for jobs grouped by shape group (JSON key), chunked as the protocol's trials."""
    padded, lengths, _ = data
    for key, jobs in by_group.items():
        group = json.loads(key)
        shape = model_shape(padded.shape[-1], group, protocol["pool_width"])
        size = models_per_chunk(shape, group["batch_size"], int(lengths.max()), CHUNK_PARAMS, CHUNK_ACTIVATIONS)
        for start in range(0, len(jobs), size):
            yield group, shape, jobs[start:start + size]


def refit_chosen(payload: dict, bags: list, inits: int = REFIT_INITS) -> list[dict]:
    """Standard nested CV refits the chosen config on the outer fold's whole training part before testing it;
    this protocol (as Hu et al.'s code) tests the model trained on inner-train. For every fold's chosen config
    (``payload["folds"]``) and its chosen epoch e: the test AUC after e epochs (no early stopping) trained on
    each arm of ``REFIT_ARMS`` (inner-train; inner-train + validation), standardized with that arm's bags,
    from ``inits`` initializations. Init 0 is the protocol's own, so the inner-train arm's init 0 retrains the
    chosen model itself: the same test AUC where the config has no dropout and was not the first model of its
    batch in the protocol's run (a batch's dropout masks draw from its first model's generator, which also
    shuffles that model's bags). One row per (seed, fold, arm, init)."""
    protocol = payload["protocol"]
    config, data, labels = _diagnostic_inputs(payload, bags)
    splits = {seed: cv_splits(labels.numpy(), protocol["n_folds"], seed, protocol["val_fraction"])
              for seed in sorted({r["seed"] for r in payload["folds"]})}
    by_group: dict[str, list] = {}
    for record in payload["folds"]:
        group = json.dumps(_protocol_group(protocol, record), sort_keys=True)
        by_group.setdefault(group, []).extend((record, arm, init) for arm in REFIT_ARMS for init in range(inits))
    rows = []
    for group, shape, part in _shape_chunks(by_group, protocol, data):
        # dropout masks of a batch draw from its first model's generator: never a protocol's own model
        part = sorted(part, key=lambda job: (job[1], job[2]) == ("inner_train", 0))
        train = [np.concatenate([splits[r["seed"]][r["fold"]][s] for s in REFIT_ARMS[arm]]) for r, arm, _ in part]
        gens = [torch.Generator().manual_seed(_stable_seed(r["seed"], r["fold"], r["variant"], group,
                                                           config["mode"], *([init] if init else [])))
                for r, _, init in part]
        history = fit_models(config, shape, data, labels, [group["variants"][r["variant"]] for r, _, _ in part], gens,
                             train_sets=[t.tolist() for t in train],
                             eval_sets={"test": [splits[r["seed"]][r["fold"]]["test"].tolist() for r, _, _ in part]},
                             standardize=[_standardization(data[0], data[1], t) for t in train],
                             batch_size=group["batch_size"], epochs=max(r["best_epoch"] for r, _, _ in part))
        rows += [{"seed": r["seed"], "fold": r["fold"], "arm": arm, "init": init, "epochs": r["best_epoch"],
                  "test_auc": float(history["test_auc"][r["best_epoch"] - 1, i])} for i, (r, arm, init) in enumerate(part)]
    return sorted(rows, key=lambda row: (row["seed"], row["fold"], row["arm"], row["init"]))


INNER_CV_FOLDS = 5  # --inner_cv_top: inner stratified folds of the outer training part


def experiment_records(payload: dict) -> list[dict]:
    """Every config's record of a result file's sweep, decoded from its committed trial files."""
    files = sorted((training.REPO_DIR / payload["experiment"]).glob("*.json"))
    trials = [json.loads(f.read_text()) for f in files]
    return [r for t in trials for r in decode_records(t["history"][-1]["records"], t["config"])]


def _inner_cv_jobs(protocol: dict, records: Sequence[dict], labels: np.ndarray, top: int,
                   inner_folds: int) -> dict[str, list]:
    """``inner_cv_choice``'s trainings by shape group (JSON key): (record, its rank in the protocol's choice,
    inner fold k, training bags, held-out bags) for the ``top`` configs of every outer fold, whose outer
    training part (inner-train + validation) is split into ``inner_folds`` stratified folds."""
    folds: dict[tuple, list[dict]] = {}
    for record in records:
        folds.setdefault((record["seed"], record["fold"]), []).append(record)
    splits = {seed: cv_splits(labels, protocol["n_folds"], seed, protocol["val_fraction"])
              for seed in {s for s, _ in folds}}
    by_group: dict[str, list] = {}
    for (seed, fold), rows in sorted(folds.items()):
        split = splits[seed][fold]
        rest = np.sort(np.concatenate([split["train"], split["val"]]))
        inner = stratified_folds(labels[rest], inner_folds, np.random.default_rng([seed, 2, fold]))
        for rank, record in enumerate(sorted(rows, key=_choice_order)[:top]):
            group = json.dumps(_protocol_group(protocol, record), sort_keys=True)
            by_group.setdefault(group, []).extend((record, rank, k, np.setdiff1d(rest, rest[held]), rest[held])
                                                  for k, held in enumerate(inner))
    return by_group


def inner_cv_choice(payload: dict, records: Sequence[dict], bags: list, top: int,
                    inner_folds: int = INNER_CV_FOLDS) -> list[dict]:
    """A less noisy choice than one validation split: per outer fold, the ``top`` configs of the protocol's
    validation ranking (``_choice_order``), each at its chosen epoch e, are trained for e epochs on the outer
    training part (inner-train + validation) minus each of ``inner_folds`` stratified inner folds and scored on
    that fold; the config with the best mean inner-fold AUC (ties: lower mean loss, then the protocol's rank)
    is chosen. Returns its protocol record per fold (``refit_chosen`` retrains it), with ``inner_cv_auc`` and
    ``protocol_rank``. No test data enters the choice."""
    protocol = payload["protocol"]
    config, data, labels = _diagnostic_inputs(payload, bags)
    by_group = _inner_cv_jobs(protocol, records, labels.numpy(), top, inner_folds)
    scores: dict[tuple, tuple] = {}  # (seed, fold, rank) -> (record, inner-fold AUCs, losses)
    total, done = sum(map(len, by_group.values())), 0
    for group, shape, part in _shape_chunks(by_group, protocol, data):
        gens = [torch.Generator().manual_seed(_stable_seed(r["seed"], r["fold"], r["variant"], group, config["mode"],
                                                           "inner", k)) for r, _, k, _, _ in part]
        history = fit_models(config, shape, data, labels, [group["variants"][r["variant"]] for r, *_ in part], gens,
                             train_sets=[train.tolist() for *_, train, _ in part],
                             eval_sets={"val": [held.tolist() for *_, held in part]},
                             standardize=[_standardization(data[0], data[1], train) for *_, train, _ in part],
                             batch_size=group["batch_size"], epochs=max(r["best_epoch"] for r, *_ in part))
        for i, (r, rank, *_) in enumerate(part):
            _, aucs, losses = scores.setdefault((r["seed"], r["fold"], rank), (r, [], []))
            aucs.append(float(history["val_auc"][r["best_epoch"] - 1, i]))
            losses.append(float(history["val_loss"][r["best_epoch"] - 1, i]))
        done += len(part)
        if done * 10 // total > (done - len(part)) * 10 // total:  # about every tenth of the work
            print(f"inner CV: {done} of {total} trainings done", flush=True)
    chosen: dict[tuple, tuple] = {}
    for (seed, fold, rank), (record, aucs, losses) in scores.items():
        order = (-_nan_to(float(np.nanmean(aucs)), -1.0), _nan_to(float(np.nanmean(losses)), math.inf), rank)
        if (seed, fold) not in chosen or order < chosen[(seed, fold)][0]:
            chosen[(seed, fold)] = (order, {**record, "inner_cv_auc": float(np.nanmean(aucs)), "protocol_rank": rank})
    return [chosen[key][1] for key in sorted(chosen)]


def _per_seed_auc(rows: Sequence[dict]) -> dict[int, float]:
    """Test AUC x 100 per repetition: mean over its folds of the fold's mean over the given rows (inits)."""
    folds: dict[tuple, list[float]] = {}
    for row in rows:
        folds.setdefault((row["seed"], row["fold"]), []).append(row["test_auc"])
    seeds = sorted({s for s, _ in folds})
    return {s: 100 * float(np.mean([np.mean(v) for (t, _), v in folds.items() if t == s])) for s in seeds}


def refit_summary(rows: Sequence[dict]) -> dict:
    """Mean +- std over repetitions (as ``summarize``) of each arm (inits averaged per fold), of the inner-train
    arm's init 0 (the protocol's chosen models retrained) and of the paired gain train_val - inner_train."""
    def stat(values: Sequence[float]) -> dict:
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    arms = {arm: _per_seed_auc([r for r in rows if r["arm"] == arm]) for arm in REFIT_ARMS}
    own = _per_seed_auc([r for r in rows if r["arm"] == "inner_train" and r["init"] == 0])
    return {**{arm: stat(list(per_seed.values())) for arm, per_seed in arms.items()},
            "inner_train_init0": stat(list(own.values())),
            "gain": stat([arms["train_val"][s] - arms["inner_train"][s] for s in arms["inner_train"]])}


def _reproduced(chosen: Sequence[dict], rows: Sequence[dict]) -> dict:
    """How many chosen models without dropout the inner-train arm's init 0 retrained to the protocol's test AUC
    (the others: the first model of their batch, or float rounding of a differently composed batch)."""
    own = {(r["seed"], r["fold"]): r["test_auc"] for r in rows if (r["arm"], r["init"]) == ("inner_train", 0)}
    no_dropout = [r for r in chosen if r["dropout"] == 0]
    same = sum(abs(own[(r["seed"], r["fold"])] - r["test_auc"]) < 1e-6 for r in no_dropout)
    return {"no_dropout_folds": len(no_dropout), "same_test_auc": int(same)}


def run_refit(args: argparse.Namespace, mode: str) -> dict:
    """``--refit``: ``refit_chosen`` on the chosen configs of the result file of (--dataset, mode, --search), or
    with ``--inner_cv_top N`` on those of ``inner_cv_choice``; written to ``<results_dir>/refit/<stem>.json``
    (``<stem>_inner_cv_top<N>.json``), a diagnostic beside the protocol's result, never in its table."""
    stem = results_stem(args.dataset, mode, args.search, args.num_samples, explicit_map_params(args, mode))
    source = Path(args.results_dir) / f"{stem}.json"
    payload = json.loads(source.read_text())
    bags = training_data(args.dataset, args.data_dir)
    if payload["protocol"]["data"] != dataset_digest(bags):
        raise SystemExit(f"{training.repo_relative(source)} was computed on other data than the embedded "
                         f"{args.dataset} files: rerun the protocol first")
    top = args.inner_cv_top
    choice = "protocol" if top is None else f"inner {INNER_CV_FOLDS}-fold CV among the top {top}"
    print(f"[{args.dataset}/{mode}] refit of the chosen configs of {training.repo_relative(source)} (choice: {choice}): "
          f"arms {', '.join(REFIT_ARMS)}, {REFIT_INITS} inits each")
    training.trial_device({"cpus_per_trial": 1})  # one thread, as the protocol's trials: their float sums
    start = time.time()
    chosen = payload["folds"] if top is None else inner_cv_choice(payload, experiment_records(payload), bags, top)
    rows = refit_chosen({**payload, "folds": chosen}, bags)
    out = {"dataset": args.dataset, "mode": mode, "search": payload["protocol"]["search"], "choice": choice,
           "source": training.repo_relative(source), "inits": REFIT_INITS,
           "arms": {arm: " + ".join(parts) for arm, parts in REFIT_ARMS.items()},
           "protocol_auc": {"mean": payload["summary"]["auc_mean"], "std": payload["summary"]["auc_std"]},
           "summary": refit_summary(rows), "reproduced": _reproduced(chosen, rows),
           "changed_choices": sum(_config_key(a) != _config_key(b) for a, b in zip(chosen, payload["folds"])),
           "precision": payload["protocol"]["precision"],
           "wall_time_s": time.time() - start, "git_commit": training.git_commit(), "cpu": training.cpu_model(),
           "chosen": chosen, "rows": rows}
    path = refit_path(args.results_dir, stem, top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    s = out["summary"]
    print(f"[{args.dataset}/{mode}] test AUC x100: inner-train {s['inner_train']['mean']:.1f} ± "
          f"{s['inner_train']['std']:.1f}, inner-train + validation {s['train_val']['mean']:.1f} ± "
          f"{s['train_val']['std']:.1f} (gain {s['gain']['mean']:+.1f} ± {s['gain']['std']:.1f}); wrote "
          f"{training.repo_relative(path)}")
    return out


def refit_table(results_dir: Path) -> str:
    """README block ``real_world_refit``: the ``--refit`` files of ``<results_dir>/refit/``."""
    paths = sorted((Path(results_dir) / "refit").glob("*.json"))
    if not paths:
        return ("No refit yet (`python3 real_world_mil.py --dataset tiger --mode sparse --refit`, after the "
                "protocol's run).")
    lines = ["| dataset / mode | search | choice | folds choosing another config than the protocol | protocol: chosen "
             "test AUC | chosen configs on inner-train, the protocol's init | of those without dropout, retrained to "
             "the protocol's test AUC | inner-train | inner-train + validation | gain of the refit (paired) | "
             "published |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    outs = [json.loads(p.read_text()) for p in paths]
    for out in sorted(outs, key=lambda o: (DATASETS.index(o["dataset"]), o["mode"], o["search"], o["choice"] != "protocol",
                                           o["choice"])):
        s, ref, same = out["summary"], PUBLISHED_AUC.get(out["dataset"]), out["reproduced"]
        cells = [out["choice"], f"{out['changed_choices']} of {len(out['chosen'])}", _mean_std_cell(out["protocol_auc"], 1),
                 _mean_std_cell(s["inner_train_init0"], 1), f"{same['same_test_auc']} of {same['no_dropout_folds']}",
                 _mean_std_cell(s["inner_train"], 1), _mean_std_cell(s["train_val"], 1),
                 f"{s['gain']['mean']:+.1f} ± {s['gain']['std']:.1f}", f"{ref[0]} ± {ref[1]}" if ref else "–"]
        lines.append(f"| {out['dataset']} / {out['mode']} | {out['search']} | " + " | ".join(cells) + " |")
    inits = sorted({out["inits"] for out in outs})
    return "\n".join(lines + ["", f"Test AUC x 100, mean ± std over repetitions; the arms average "
                               f"{', '.join(map(str, inits))} initializations per fold, the first the protocol's own."])


# --------------------------------------------------------------------------------------------------
# Report: markdown table + plot from the result files
# --------------------------------------------------------------------------------------------------
def load_results(results_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        payload = json.loads(path.read_text())
        if {"dataset", "mode", "summary"} <= payload.keys():
            out.append(payload)
    return out


def _result_map(result: dict) -> str:
    """The table column of a result: its ``map_label``."""
    return map_label(result["mode"], result.get("map_params", {}))


def _map_columns(results: Sequence[dict]) -> list[str]:
    """The ``_result_map`` labels of these results, in ``MODES`` order (explicit parameters after the defaults)."""
    return sorted({_result_map(r) for r in results},
                  key=lambda label: (MODES.index(label.split(" ")[0]), label))


def map_defaults_note(results: Sequence[dict]) -> str:
    """The caption's account of the columns: what the aliases name, and the parameters a column without explicit
    ones ran with (``sparsemax.MODE_DEFAULTS`` of the parameters that --alpha / --k set)."""
    modes = {r["mode"] for r in results}
    named = [f"{mode} = {name}" for mode, name in {**MODE_ALIASES, "entmax": "1.5-entmax"}.items() if mode in modes]
    defaults = [f"{mode} {name}={sparsemax.MODE_DEFAULTS[mode][name]:g}" for mode in MODES if mode in modes
                for name in MAP_PARAMS.get(mode, ())]
    parts = [", ".join(named)] if named else []
    if defaults:
        parts.append("a column without parameters ran with " + ", ".join(defaults)
                     + (" (gsh: the initial alpha, then learned per head)" if "gsh" in modes else ""))
    return f"Maps: {'; '.join(parts)}." if parts else ""


def _preferred(results: Sequence[dict]) -> dict:
    """The result a table cell (and bar) shows: the published protocol (search hu) where it exists, else the
    run with the most trainings (ties: the first file)."""
    return max(results, key=lambda r: (r["protocol"]["search"] == "hu", r.get("n_trainings", 0)))


def markdown_table(results: Sequence[dict]) -> str:
    """Datasets x modes table of test AUC x 100 (mean +- std over repetitions; the published protocol where it
    has run, see ``_preferred``, then the other searches' results) with the Hopfield-pooling reference of
    Ramsauer et al. (2021, Table 1)."""
    modes = _map_columns(results)
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in results)]
    header = "| dataset | " + " | ".join(modes) + " | published (Ramsauer et al. 2021) |"
    lines = [header, "|" + "---|" * (len(modes) + 2)]
    for dataset in datasets:
        cells = []
        for mode in modes:
            match = [r for r in results if r["dataset"] == dataset and _result_map(r) == mode]
            if match:
                chosen = _preferred(match)
                s, p = chosen["summary"], chosen["protocol"]
                stopping = ", stop" if p.get("patience") or p.get("halving_rungs") else ""
                others = "".join(f"; {r['protocol']['search']}: {r['summary']['auc_mean']:.1f} ± "
                                 f"{r['summary']['auc_std']:.1f}"
                                 for r in sorted(match, key=lambda r: -r.get("n_trainings", 0)) if r is not chosen)
                cells.append(f"{s['auc_mean']:.1f} ± {s['auc_std']:.1f} ({p['search']}, {s['n_seeds']}x{p['n_folds']}"
                             f"{stopping}){others}")
            else:
                cells.append("–")
        ref = PUBLISHED_AUC.get(dataset)
        lines.append(f"| {dataset} | " + " | ".join(cells) + f" | {f'{ref[0]} ± {ref[1]}' if ref else '–'} |")
    lines.append("")
    lines.append("Test AUC x 100, mean ± std over repetitions (search space, repetitions x outer folds; 'stop': with "
                 "early stopping and successive halving; after ';': the same cell's other searches); nested CV, "
                 "configs chosen on inner validation splits only. Published: Ramsauer et al.'s Table 1, which reports "
                 f"{', '.join(PUBLISHED_AUC)} only ('–' for "
                 f"{', '.join(d for d in DATASETS if d not in PUBLISHED_AUC)}). "
                 + map_defaults_note(results))
    return "\n".join(lines)


def plot_results(results: Sequence[dict], path: Path) -> Path:
    """Grouped bars: AUC per mode per dataset with std error bars (hatched where the cell is not the published
    protocol's full grid but a smaller search); published reference as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = _map_columns(results)
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in results)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.45 * len(datasets) * (len(modes) + 1)), 3.8))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        xs, ys, es, hatches = [], [], [], []
        for i, dataset in enumerate(datasets):
            match = [r for r in results if r["dataset"] == dataset and _result_map(r) == mode]
            if match:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                shown = _preferred(match)
                ys.append(shown["summary"]["auc_mean"])
                es.append(shown["summary"]["auc_std"])
                hatches.append("" if shown["protocol"]["search"] == "hu" else "//")
        bars = ax.bar(xs, ys, width, yerr=es, capsize=3, label=mode)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
    if any(bar.get_hatch() for bar in ax.patches):
        ax.bar([0], [0], 0, color="white", edgecolor="black", hatch="//", label="smaller search (not the full grid)")
    for i, dataset in enumerate(datasets):
        if dataset in PUBLISHED_AUC:
            mean, std = PUBLISHED_AUC[dataset]
            ax.errorbar([i + 0.5], [mean], yerr=[std], fmt="k*", capsize=3,
                        label="Ramsauer et al. 2021" if i == 0 else None)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("test AUC x 100")
    ax.set_ylim(40, 105)
    ax.set_xlim(-0.6, len(datasets) - 0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.set_title("Real-world MIL, Hopfield pooling (nested CV)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_search_size(results: Sequence[dict], path: Path) -> Path | None:
    """The search-size curve of every full-protocol result (``selection["by_search_size"]`` and the full search's
    choice): expected test AUC of the validation choice against the number of configs searched (log scale), mean
    +- std over repetitions, beside the published AUC; None (nothing drawn) without a full-protocol result."""
    rows = [r for r in results if r["protocol"]["search"] == "hu" and "by_search_size" in r.get("selection", {})]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(1.0 + 3.6 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):  # one panel per dataset (their AUC ranges differ), a line per mode
        for r in sorted((r for r in rows if r["dataset"] == dataset), key=_result_map):
            sel = r["selection"]
            sizes = sorted(sel["by_search_size"], key=int)
            stats = [sel["by_search_size"][n] for n in sizes] + [sel["chosen_test_auc"]]
            ax.errorbar([int(n) for n in sizes] + [sel["configs_per_fold"]], [s["mean"] for s in stats],
                        yerr=[s["std"] for s in stats], marker="o", capsize=3, label=_result_map(r))
        if dataset in PUBLISHED_AUC:
            ax.axhline(PUBLISHED_AUC[dataset][0], color="k", linestyle=":", linewidth=1, label="Ramsauer et al. 2021")
        ax.set_xscale("log")
        ax.set_xlabel("configs searched (at random from the grid)", fontsize=8)
        ax.set_title(f"{dataset}: the choice vs the search size", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test AUC x 100 of the validation choice\n(mean ± std over repetitions)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


ENGINE_CHECKS_DIR = training.REPO_DIR / "results" / "engine_checks"


def engine_checks_table(root: Path = ENGINE_CHECKS_DIR) -> str:
    """One protocol (``root/real_world_<search>/``) under each variant ``<precision>_stopping_<on|off>/``: test
    AUC, model-epochs trained and trial time per dataset and mode, and whether the variant lies within one
    std of ``fp32_stopping_off`` (the plain protocol) of the same search."""
    lines = ["| dataset / mode | search | variant | test AUC x 100 | model-epochs | trial time (s) | within one std "
             "of fp32, no stopping |", "|---|---|---|---|---|---|---|"]
    for search_dir in sorted(root.glob("real_world_*")) if root.exists() else []:
        variants = {d.name: {(r["dataset"], r["mode"]): r for r in load_results(d)}
                    for d in sorted(search_dir.iterdir()) if d.is_dir()}
        for key in sorted({k for results in variants.values() for k in results}):
            base = variants.get("fp32_stopping_off", {}).get(key)
            for name, results in variants.items():
                r = results.get(key)
                if r is None:
                    continue
                s, b = r["summary"], base["summary"] if base else None
                within = "–" if b is None or r is base else (
                    "yes" if abs(s["auc_mean"] - b["auc_mean"]) <= max(s["auc_std"], b["auc_std"]) else "no")
                lines.append(f"| {key[0]} / {key[1]} | {r['protocol']['search']} | {name} | {s['auc_mean']:.1f} ± "
                             f"{s['auc_std']:.1f} | {r.get('model_epochs', '–')} | {r['wall_time_s']:.0f} | {within} |")
    return "\n".join(lines)


def _repetition_cost(files: list[Path]) -> dict:
    """Trial time, model-epochs and wall clock (``training.sweep_wall_clock_s``) of one repetition's trial files."""
    trials = [json.loads(f.read_text()) for f in files]
    epochs = sum(r["epochs_trained"] for t in trials for r in decode_records(t["history"][-1]["records"], t["config"]))
    return {"trial_s": sum(t["wall_time_s"] for t in trials), "wall_s": training.sweep_wall_clock_s(trials),
            "model_epochs": epochs}


def sweep_cost_table(trials_root: Path = training.REPO_DIR / "results" / "real_world_mil" / "trials") -> str:
    """Per experiment (``trials_root/<name>/``): repetitions whose trial files are all there, and the measured
    cost of one: trial time (summed over its trials), wall clock (time during which one of its trials ran, so a
    repetition resumed in a later session does not count the gap), model-epochs;
    and the whole protocol's wall clock extrapolated from them (x ``n_seeds``)."""
    lines = ["| dataset / mode | search | configs | repetitions done | trial files | per repetition: trial time (min) | "
             "wall clock (min) | model-epochs | all repetitions, extrapolated: wall clock (h) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for exp in sorted(d for d in trials_root.iterdir() if (d / "experiment.json").exists()) if trials_root.exists() else []:
        protocol = json.loads((exp / "experiment.json").read_text())
        groups = group_by_shape(search_configs(protocol["search"], protocol["num_samples"], protocol["seed"]))
        per_seed = [sorted((exp / "trials").glob(f"seed{protocol['seed'] + r}_*.json")) for r in range(protocol["n_seeds"])]
        done = [_repetition_cost(files) for files in per_seed if len(files) == len(groups)]
        cells = ["–"] * 4
        if done:
            mean = {k: float(np.mean([d[k] for d in done])) for k in done[0]}
            cells = [f"{mean['trial_s'] / 60:.1f}", f"{mean['wall_s'] / 60:.1f}", f"{mean['model_epochs']:.0f}",
                     f"{protocol['n_seeds'] * mean['wall_s'] / 3600:.2f}"]
        lines.append(f"| {protocol['dataset']} / {protocol['mode']} | {protocol['search']} | "
                     f"{sum(len(g['variants']) for g in groups)} | {len(done)} of {protocol['n_seeds']} | "
                     f"{sum(map(len, per_seed))} of {protocol['n_seeds'] * len(groups)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(results_dir: Path, img_dir: Path) -> str:
    results = load_results(results_dir)
    if not results:
        raise SystemExit(f"no result files in {results_dir}; run e.g. "
                         f"`python3 real_world_mil.py --dataset fox --mode sparse --search small` first")
    table = markdown_table(results)
    (Path(results_dir) / "table.md").write_text(table + "\n")
    plot = plot_results(results, Path(img_dir) / "real_world_mil_auc.png")
    curve = plot_search_size(results, Path(img_dir) / "real_world_search_size.png")
    print(table)
    print(f"wrote {training.repo_relative(Path(results_dir) / 'table.md')} and {training.repo_relative(plot)}"
          + (f" and {training.repo_relative(curve)}" if curve else ""))
    if Path(results_dir).resolve() == (training.REPO_DIR / "results" / "real_world_mil").resolve():
        for block, text in (("real_world_table", table), ("real_world_engine_checks", engine_checks_table()),
                            ("real_world_cost", sweep_cost_table()), ("real_world_selection", selection_table(results)),
                            ("real_world_refit", refit_table(results_dir))):
            if training.write_readme_block(block, text):
                print(f"wrote the README's {block}")
    return table


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fox", help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--mode", default="sparse",
                        help=f"retrieval map: one of {', '.join(MODES)}, or 'all' ({', '.join(ALL_MODES)})")
    parser.add_argument("--search", default=None, choices=SEARCHES,
                        help="hu: the full grid of Hu et al. (864 configs; default); small: 4 configs (see "
                             "SMALL_GRID); random: --num_samples configs from the hu grid; quick: a tiny smoke grid; "
                             "ramsauer: --num_samples configs from Ramsauer et al.'s Table A.2 space (19,440 "
                             f"configs, RAMSAUER_GRID; default --epochs {RAMSAUER_EPOCHS}; its own pooling structure)")
    parser.add_argument("--num_samples", type=training.positive_int, default=None,
                        help=f"configs for --search {' / '.join(SAMPLED_SEARCHES)} (default {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="repetition r uses seed + r (splits and inits)")
    parser.add_argument("--n_seeds", type=training.positive_int, default=None, help="repetitions, each a different "
                                                                                     "split (default 5)")
    parser.add_argument("--n_folds", type=_at_least_two, default=None, help="outer stratified folds (default 10)")
    parser.add_argument("--val_fraction", type=training.open_fraction, default=0.2,
                        help="inner validation share of a training part, in (0, 1)")
    parser.add_argument("--epochs", type=training.positive_int, default=None,
                        help=f"default 50 ({RAMSAUER_EPOCHS} for --search ramsauer; --quick: 2)")
    parser.add_argument("--weight_decay", type=training.nonnegative_float, default=1e-4)
    parser.add_argument("--grad_clip", type=training.positive_float, default=1.0)
    parser.add_argument("--pool_width", default=None, choices=("per_head", "total"),
                        help="per_head: HopfieldPooling(d_model=emb_dims, n_heads, head_dim=hidden_dim) (Hu et al.; "
                             "default); total: hidden_dim is the total pooling width, rounded up to a multiple of "
                             "n_heads. Not with --search ramsauer (its space sets the structure, POOLING['ramsauer'])")
    parser.add_argument("--alpha", type=training.positive_float, default=None,
                        help="alpha of entmax_alpha / normmax / gsh (init)")
    parser.add_argument("--k", type=training.positive_int, default=None, help="k of k_subsets / sequential_k_subsets")
    stop = parser.add_argument_group("early stopping and successive halving (validation data only)")
    stop.add_argument("--patience", type=training.nonnegative_int, default=5,
                      help="stop a config when its best validation AUC has not improved for this many epochs "
                           "(Hu et al.'s code: 5); 0 = off (default 5)")
    stop.add_argument("--halving_rungs", type=_rungs, default=None,
                      help="comma-separated epochs after which, per outer fold, only the best --halving_keep share "
                           "of the configs trained together (one architecture shape, all its lr/decay/beta/dropout "
                           "variants) by validation AUC train on; 'none' = off (default 5,15)")
    stop.add_argument("--halving_keep", type=training.open_fraction, default=1 / 3,
                      help="share of configs kept at each rung, in (0, 1) (default 1/3)")
    training.add_precision_arg(parser)  # auto = fp32 on the CPU here (measured faster), bf16 on a bf16 GPU
    parser.add_argument("--bag_layout", choices=BAG_LAYOUTS, default="auto",
                        help="padded: every bag of a training step padded to the longest; ragged: the instance "
                             "encoder sees only the real instances (the same model up to float rounding; faster "
                             "where bag lengths differ much); auto (default): ragged for data whose longest bag "
                             f"holds >= {RAGGED_FROM:g}x the mean bag's instances (Musk1, Musk2), else padded")
    parser.add_argument("--chunk_params", type=training.positive_float, default=CHUNK_PARAMS,
                        help="max parameters of one batched model (models per chunk = this / model size); "
                             "~1-3M is fastest on CPU (cache), see bench/bench_real_world.py")
    parser.add_argument("--chunk_activations", type=training.positive_float, default=CHUNK_ACTIVATIONS,
                        help="max activation floats of one training step of a chunk (bounds models per chunk)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK}, written under results/quick/ (explicit flags win)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from result files")
    parser.add_argument("--refit", action="store_true",
                        help="diagnostic: retrain the chosen config of every fold of this dataset/mode/search's result "
                             "file on inner-train and on inner-train + validation for its chosen epochs "
                             f"({REFIT_INITS} inits each) -> <results_dir>/refit/<stem>.json (minutes)")
    parser.add_argument("--inner_cv_top", type=training.positive_int, default=None,
                        help=f"with --refit: choose per outer fold among the N best configs by the protocol's validation "
                             f"AUC by their mean AUC over {INNER_CV_FOLDS} inner folds of the outer training part, then "
                             "refit that choice -> <results_dir>/refit/<stem>_inner_cv_top<N>.json")
    parser.add_argument("--results_dir", default=None,
                        help="result files and trials/ (default results/real_world_mil; --quick: results/quick/real_world_mil)")
    parser.add_argument("--img_dir", default=None,
                        help="the AUC figure (default imgs; --quick: results/quick/imgs; with --results_dir: that directory)")
    parser.add_argument("--data_dir", default=None, help="directory of the benchmark files (default: datasets/data)")
    training.add_ray_args(parser, "real_world_mil")
    return parser


# --quick: a smoke setting; full defaults otherwise. Explicit flags win over both.
QUICK = dict(search="quick", n_folds=3, n_seeds=1, epochs=2, halving_rungs=(1,))
FULL = dict(search="hu", n_folds=10, n_seeds=5, epochs=50, halving_rungs=(5, 15))


def _at_least_two(text: str) -> int:
    value = training.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 2")
    return value


def _rungs(text: str) -> tuple[int, ...]:
    if text.lower() in ("none", "off", ""):
        return ()
    try:
        rungs = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of epochs (or 'none')") from None
    if any(r < 1 for r in rungs) or list(rungs) != sorted(set(rungs)):
        raise argparse.ArgumentTypeError(f"{text!r}: rungs must be increasing epochs >= 1")
    return rungs


REFIT_FLAGS = ("dataset", "mode", "alpha", "k", "search", "num_samples", "results_dir", "data_dir", "inner_cv_top")
REPORT_FLAGS = ("quick", "results_dir", "img_dir")  # --quick: the smoke results under results/quick/


def _refit_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--refit takes its protocol from the result file: only the flags naming that file apply, and the file
    of every requested mode must exist."""
    training.refuse_flags_besides(parser, args, "refit", REFIT_FLAGS,
                                  "retrains the chosen configs of a result file with that file's protocol")
    args.search = args.search or FULL["search"]
    n_configs = len(search_configs(args.search, args.num_samples, 0))  # the count does not depend on the seed
    if args.inner_cv_top is not None and args.inner_cv_top > n_configs:
        parser.error(f"--inner_cv_top {args.inner_cv_top}: --search {args.search} has only {n_configs} configs")
    default_dir = training.REPO_DIR / "results" / "real_world_mil"
    args.results_dir = args.results_dir or str(default_dir)
    args.img_dir = str(training.REPO_DIR / "imgs" if Path(args.results_dir).resolve() == default_dir.resolve()
                       else args.results_dir)
    for mode in available_modes(args.mode):
        stem = results_stem(args.dataset, mode, args.search, args.num_samples, explicit_map_params(args, mode))
        source = Path(args.results_dir) / f"{stem}.json"
        if not source.exists():
            params = "".join(f" --{p} {v:g}" for p, v in explicit_map_params(args, mode).items())
            parser.error(f"--refit needs the result file {training.repo_relative(source)}: run `python3 "
                         f"real_world_mil.py --dataset {args.dataset} --mode {mode}{params} --search {args.search}` "
                         "first")
    training_data(args.dataset, args.data_dir)  # a missing or corrupt file fails here, named
    return args


def refuse_unused_flags(args: argparse.Namespace) -> None:
    """--num_samples outside a sampled search, --alpha / --k for maps without that parameter: errors."""
    search = args.search or ("quick" if args.quick else FULL["search"])
    training.refuse_unused_flag("num_samples", args.num_samples, search in SAMPLED_SEARCHES,
                                f"--search {' / '.join(SAMPLED_SEARCHES)} (got --search {search})")
    modes = ALL_MODES if args.mode == "all" else (args.mode,)
    for param in ("alpha", "k"):
        users = [mode for mode in MODES if param in MAP_PARAMS.get(mode, ())]
        training.refuse_unused_flag(param, getattr(args, param), any(mode in users for mode in modes),
                                    f"--mode {' / '.join(users)} (got --mode {args.mode})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset.lower() not in DATASETS:
        parser.error(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    args.dataset = args.dataset.lower()
    if args.mode != "all" and args.mode not in MODES:
        parser.error(f"unknown mode {args.mode!r}; choose one of: {', '.join(MODES)}, all")
    if args.report:
        training.refuse_flags_besides(parser, args, "report", REPORT_FLAGS,
                                      "rebuilds the table and figures from result files")
    refuse_unused_flags(args)
    args.num_samples = args.num_samples or DEFAULT_NUM_SAMPLES  # recorded in every protocol, read by sampled searches
    if args.search in SAMPLED_SEARCHES:
        try:  # more samples than the space holds
            search_configs(args.search, args.num_samples, args.seed)
        except ValueError as error:
            parser.error(str(error))
    if args.refit:
        return _refit_args(parser, args)
    if args.inner_cv_top is not None:
        parser.error("--inner_cv_top chooses the configs that --refit retrains: give --refit too")
    if args.search == "ramsauer":
        if args.pool_width is not None:
            parser.error("--pool_width does not apply to --search ramsauer (its space sets the pooling structure)")
        args.pool_width = "ramsauer"
        if args.epochs is None and not args.quick:
            args.epochs = RAMSAUER_EPOCHS  # Table A.2; --quick keeps its smoke epochs
    args.pool_width = args.pool_width or "per_head"
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.halving_rungs and args.halving_rungs[-1] >= args.epochs:
        parser.error(f"--halving_rungs {','.join(map(str, args.halving_rungs))}: rungs must lie before the last "
                     f"epoch ({args.epochs})")
    args.patience = args.patience or None
    smoke = training.REPO_DIR / "results" / "quick"
    own_results_dir = args.results_dir is not None
    args.results_dir = args.results_dir or str(smoke / "real_world_mil" if args.quick
                                               else training.REPO_DIR / "results" / "real_world_mil")
    # the committed figure imgs/real_world_mil_auc.png shows results/real_world_mil only: a run with its own
    # --results_dir (an engine check, a smoke run) draws its figure beside its results
    args.img_dir = args.img_dir or str(args.results_dir if own_results_dir
                                       else smoke / "imgs" if args.quick else training.REPO_DIR / "imgs")
    if args.report:
        return args
    try:
        # the batched models are small (widths 32-1024): on this CPU bf16 autocast costs more in casts than
        # AMX saves (Fox --search small: 2-4x slower than fp32, bench/bench_engine.py part 3), so auto = fp32
        args.precision = training.resolve_precision(args.precision, use_gpu=args.gpus_per_trial > 0, cpu_auto="fp32")
    except ValueError as error:
        parser.error(str(error))
    training.check_ray_args(args)
    bags = training_data(args.dataset, args.data_dir)  # a missing or corrupt file fails here, named, before Ray starts
    if args.bag_layout == "auto":
        args.bag_layout = auto_bag_layout(bags)
    return args


def available_modes(requested: str) -> list[str]:
    """Expand 'all'; skip (with a note) maps not implemented in this checkout of sparsemax.py."""
    if requested != "all":
        return [requested]
    modes = []
    for mode in ALL_MODES:
        try:
            sparsemax.get_map(MODE_ALIASES.get(mode, mode))(torch.zeros(1, 3))
            modes.append(mode)
        except NotImplementedError:
            print(f"skipping mode {mode}: not implemented in sparsemax.py")
    return modes


def protocol_of(args: argparse.Namespace, mode: str, bags: list) -> dict:
    keys = ("search", "num_samples", "seed", "n_seeds", "n_folds", "val_fraction", "epochs", "weight_decay",
            "grad_clip", "pool_width", "alpha", "k", "precision", "patience", "halving_keep")
    protocol = {k: getattr(args, k) for k in keys}
    protocol.update(dataset=args.dataset, mode=mode, pooling=POOLING[args.pool_width],
                    halving_rungs=list(args.halving_rungs), data=dataset_digest(bags))
    if args.search == "ramsauer":  # keys of this search only: the other searches' protocols stay as committed
        protocol.update(space={k: RAMSAUER_GRID[k] for k in sorted(RAMSAUER_GRID)}, bag_dropout=BAG_DROPOUT)
    if args.bag_layout == "ragged":  # as above: padded protocols (and their trial files) stay as committed
        protocol.update(bag_layout="ragged")
    return protocol


def dataset_digest(bags: list) -> str:
    """sha1 of the loaded bags (features and labels; the files are sha256-checked on load): a trial file
    is reused only for the same data."""
    digest = hashlib.sha1()
    for x, y in bags:
        digest.update(np.ascontiguousarray(x).tobytes())
        digest.update(str(int(y)).encode())
    return digest.hexdigest()


def trial_configs(args: argparse.Namespace, mode: str) -> list[dict]:
    """One trial per (shape group, repetition): every fold and config of that shape, batched."""
    map_name = MODE_ALIASES.get(mode, mode)
    map_params = explicit_map_params(args, mode)
    groups = group_by_shape(search_configs(args.search, args.num_samples, args.seed))
    fixed = {"dataset": args.dataset, "mode": map_name, "map_params": map_params,
             "n_folds": args.n_folds, "val_fraction": args.val_fraction, "epochs": args.epochs,
             "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "pool_width": args.pool_width,
             "chunk_params": args.chunk_params, "chunk_activations": args.chunk_activations,
             "precision": args.precision, "patience": args.patience, "halving_rungs": list(args.halving_rungs),
             "halving_keep": args.halving_keep, **({"bag_layout": "ragged"} if args.bag_layout == "ragged" else {})}
    return [{**fixed, "group": group, "seed": args.seed + r} for r in range(args.n_seeds) for group in groups]


def trial_label(config: dict) -> str:
    g = config["group"]
    return (f"seed{config['seed']}_e{g['emb_dims']}x{g['emb_layers']}_h{g['hidden_dim']}x{g['n_heads']}"
            f"_b{g['batch_size']}" + (f"_d{g['head_dim']}" if "head_dim" in g else ""))


def experiment_name(protocol: dict) -> str:
    """<dataset>_<mode>_<search>_<sha1 of the protocol, 8 hex>: the trial folder a run resumes from."""
    digest = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:8]
    return f"{protocol['dataset']}_{protocol['mode']}_{protocol['search']}_{digest}"


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """Run the protocol for one mode through Ray Tune (trial files under ``<results_dir>/trials/``,
    the experiment named by dataset, mode, search and a digest of the protocol) and write the result files."""
    bags = training_data(args.dataset, args.data_dir)  # sha256-checked: corrupt data fails before any resume
    protocol = protocol_of(args, mode, bags)
    trial_dir = training.open_experiment(Path(args.results_dir) / "trials" / experiment_name(protocol), protocol)
    configs = trial_configs(args, mode)
    n_configs = sum(len(g["variants"]) for g in group_by_shape(search_configs(args.search, args.num_samples, args.seed)))
    print(f"[{args.dataset}/{mode}] {n_configs} configs x {args.n_seeds} repetitions x {args.n_folds} folds = "
          f"{n_configs * args.n_seeds * args.n_folds} trainings in {len(configs)} Ray trials "
          f"(precision {args.precision}, {args.bag_layout} bags, patience {args.patience}, halving rungs {list(args.halving_rungs)} keep "
          f"{args.halving_keep:.3g}; {training.repo_relative(trial_dir)})")
    start = time.time()
    trials = training.run_trials(ray_trainable, configs, args, trial_dir, label=trial_label, params={"bags": bags})
    elapsed = time.time() - start
    records = [r for t in trials for r in decode_records(t["metrics"]["records"], t["config"])]
    chosen = select_configs(records)
    summary = summarize(chosen)
    compute = float(sum(t["wall_time_s"] for t in trials))
    payload = {"dataset": args.dataset, "mode": mode, "map": MODE_ALIASES.get(mode, mode),
               "map_params": configs[0]["map_params"], "protocol": protocol, "summary": summary,
               "published_auc": PUBLISHED_AUC.get(args.dataset), "wall_time_s": compute,
               "wall_time_this_run_s": elapsed, "n_trainings": len(records),
               "model_epochs": int(sum(r["epochs_trained"] for r in records)),
               "git_commits": sorted({t["git_commit"] for t in trials}), "cpus": training.trial_cpus(trials),
               "experiment": training.repo_relative(trial_dir),
               "selection": selection_diagnostics(records), "folds": chosen}
    stem = results_stem(args.dataset, mode, args.search, args.num_samples, payload["map_params"])
    paths = write_results(Path(args.results_dir) / stem, payload)
    ref = PUBLISHED_AUC.get(args.dataset)
    print(f"[{args.dataset}/{mode}] test AUC x100 = {summary['auc_mean']:.2f} ± {summary['auc_std']:.2f}, "
          f"acc = {summary['acc_mean']:.1f} ± {summary['acc_std']:.1f} over {summary['n_seeds']} repetitions "
          f"({len(records)} trainings, {payload['model_epochs']} model-epochs, {compute:.0f} s of trial time)"
          + (f"; published {ref[0]} ± {ref[1]}" if ref else ""))
    print("wrote " + ", ".join(training.repo_relative(p) for p in paths))
    return payload


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.report:
        build_report(Path(args.results_dir), Path(args.img_dir))
        return []
    training.log_config(args)
    training.seed_everything(args.seed)
    run = run_refit if args.refit else run_mode
    payloads = [run(args, mode) for mode in available_modes(args.mode)]
    build_report(Path(args.results_dir), Path(args.img_dir))
    return payloads


if __name__ == "__main__":
    main(sys.argv[1:])
