"""MNIST multiple-instance learning with Hopfield pooling (Hu et al. 2023; Santos et al. 2024).

Two tasks, one script:

* **MNIST bags** (default; Hu et al. 2023, after Ilse et al. 2018): a bag of ``--bag_size`` MNIST digits
  is positive iff it contains a 9. Model (``training.BagClassifier`` with ``training.mlp_encoder``):

      flattened 784 -> Linear -> LayerNorm -> HopfieldPooling -> GELU -> LayerNorm -> Linear -> 1 logit

  trained with AdamW + cosine schedule on BCE-with-logits, evaluated in eval mode with logit > 0.
  Reported: test accuracy of the last epoch, mean +- std over ``--trials`` seeds (no selection on test).
* **K-MIL** (``--k_mil K``; Santos et al. 2024): a bag is positive iff it holds at least K nines; a LeNet
  encoder (Ilse et al.'s, width 500) replaces the linear one. As in Santos et al.'s code (deep-spin/SSHN
  scripts/MNIST_bags.py, datasets/mnist_bags.py): bag size max(K, floor(Normal(14, 5))) (``KMIL_BAGS``),
  positives hold U{K..size} nines, negatives U{0..K-1}; weight decay 1e-4, gradient clipping 1.0, 50
  epochs. Reported: test accuracy at the epoch of best validation accuracy, mean +- std over seeds, beside
  the SparseMAP numbers of Santos et al. (default modes: softmax, sparsemax, entmax and SparseMAP k_subsets
  with k = 2, 3, 5). Still ours, not theirs (see the README): batch 16 with lr 1e-4 (theirs: batch 1, lr
  grid {1e-5, 1e-6}), cosine schedule (theirs: exponential per epoch), one fixed config (theirs: a
  64-config grid chosen on validation), marginals normalized to sum 1 (theirs: sum k), the pooling block.

Modes are the retrieval maps of ``sparsemax.py``; a mode may carry its parameter after a colon:
``k_subsets:3`` (SparseMAP over 3-subsets), ``sequential_k_subsets:2``, ``entmax_alpha:1.3``,
``normmax:3`` or ``gsh:1.2`` (initial alpha). Without it, ``k_subsets`` uses ``--k`` and alpha modes use
``--alpha`` (or the map's default).

Every (mode, seed) pair is a Ray Tune trial (``training.run_trials``): rerunning the same command (or the
same ``--exp_name``) resumes and keeps every finished trial. ``--tune`` instead samples
``--num_samples`` hyperparameter configurations per mode (space: ``sample_tune_space()``) scored on validation
bags built from MNIST-train images disjoint from the training bags' images.

Outputs: ``{img_dir}/{train_acc,test_acc,train_loss,test_loss}_{tag}.png`` (mean curve and std band per
mode), ``{img_dir}/metrics_{tag}.csv`` (per-epoch metrics of every trial), and
``{results_dir}/mnist_mil_{tag}_summary.{csv,json}`` plus the run's config; ``tag`` is the bag size, or
``kmil{K}`` for K-MIL.

    python3 mnist_mil_main.py --quick                       # minutes on 2 CPU cores
    python3 mnist_mil_main.py --bag_size 10                 # full setting of Hu et al. (5 seeds, 100 epochs)
    python3 mnist_mil_main.py --k_mil 3 --modes softmax sparsemax k_subsets:2 k_subsets:3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import sparsemax
import training

REPO_DIR = Path(__file__).resolve().parent
COMMITTED_RESULTS = REPO_DIR / "results"  # the published-protocol results the README's tables show
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss")
DEFAULT_MODES = ("softmax", "sparsemax", "entmax", "gsh")
# Santos et al.'s K-MIL table rows: the dense and sparse maps, normmax, SparseMAP k-subsets and sequential k-subsets
KMIL_DEFAULT_MODES = ("softmax", "sparsemax", "entmax", "normmax", "k_subsets:2", "k_subsets:3", "k_subsets:5",
                      "sequential_k_subsets:2")
DEFAULT_BAG_SIZE = 5
DEFAULT_K = 2  # SparseMAP k of k_subsets modes without ':k'
DEFAULT_NUM_SAMPLES = 8  # --tune configurations per mode
MODE_PARAM = {"k_subsets": ("k", int), "sequential_k_subsets": ("k", int), "entmax_alpha": ("alpha", float),
              "normmax": ("alpha", float), "gsh": ("alpha", float)}

# Hyperparameters resolved per task; ``--quick`` overrides the first group, explicit flags win over both.
BAG_DEFAULTS = dict(n_train=4000, n_val=1000, n_test=1000, epochs=100, trials=5, d_model=512, n_heads=4,
                    num_pattern=2, scale=0.1, update_steps=1, dropout=0.3, lr=1e-4, weight_decay=1e-3,
                    batch_size=256, grad_clip=None)
BAG_QUICK = dict(epochs=10, trials=2)
# Hu et al.'s run for bag size 100: their code sets num_pattern 4, their README dropout 0.1.
BAG_SIZE_DEFAULTS = {100: dict(num_pattern=4, dropout=0.1)}
# K-MIL after Santos et al.'s scripts/MNIST_bags.py (deep-spin/SSHN): LeNet width L = 500 (l. 256, 269),
# AdamW weight decay 1e-4 (l. 479), clip_grad_norm 1.0 (l. 108), 50 epochs (l. 520), 2000 train bags
# (l. 73), 500 val / 500 test bags (l. 551-562). Their heads, head width, beta, dropout, lr {1e-5, 1e-6}
# and lr decay are a grid. Their batch is 1 bag (l. 559-614); ours stays 16 (with lr 1e-4, about their
# parameter travel per epoch at 1e-5): the stacked trainer trims a batch to its longest bag, and a batch
# of bags all shorter than k fails k_subsets:k (k <= n), which batch 1 would hit (sizes go down to K).
KMIL_DEFAULTS = dict(n_train=2000, n_val=500, n_test=500, epochs=50, trials=5, d_model=500, n_heads=4,
                     num_pattern=1, scale=None, update_steps=1, dropout=0.0, lr=1e-4, weight_decay=1e-4,
                     batch_size=16, grad_clip=1.0)
# Bag sizes of Santos et al.'s generator: max(K, int(normal(mean 14, std 5))) (MNIST_bags.py l. 77-78,
# datasets/mnist_bags.py l. 112-113); int() truncation = floor once clipped to >= K >= 1.
KMIL_BAGS = dict(mean_bag_size=14.0, std_bag_size=5.0, rounding="floor")
KMIL_QUICK = dict(n_train=500, n_val=200, n_test=200, epochs=5, trials=2)

# Santos et al. (2024), K-MIL test accuracy (%) of SparseMAP k-subsets pooling: {k: {K: acc}}, and its std.
SANTOS_KMIL_SPARSEMAP = {2: {2: 97.7, 3: 95.1, 5: 92.6}, 3: {2: 96.1, 3: 96.5, 5: 92.2},
                         5: {2: 96.2, 3: 95.1, 5: 95.1}}
SANTOS_KMIL_SPARSEMAP_STD = {2: {2: 0.3, 3: 0.5, 5: 1.1}, 3: {2: 1.0, 3: 0.5, 5: 1.2}, 5: {2: 1.4, 3: 1.1, 5: 1.5}}


def sample_tune_space(rng: np.random.Generator) -> dict:
    """One hyperparameter configuration of ``--tune`` (drawn ``--num_samples`` times per mode)."""
    def choice(values: Sequence) -> Any:
        return values[int(rng.integers(len(values)))]

    return {"lr": float(10 ** rng.uniform(-5, -3)), "weight_decay": float(10 ** rng.uniform(-4, -2)),
            "dropout": choice([0.0, 0.1, 0.3, 0.5]), "scale": choice([0.05, 0.1, 0.25, 0.5, 1.0]),
            "d_model": choice([128, 256, 512]), "n_heads": choice([1, 2, 4]), "num_pattern": choice([1, 2, 4])}


TUNED = ("lr", "weight_decay", "dropout", "scale", "d_model", "n_heads", "num_pattern")  # sample_tune_space's keys
TUNE_SPACE_DOC = ("lr ~ loguniform(1e-5, 1e-3), weight_decay ~ loguniform(1e-4, 1e-2), dropout in {0, .1, .3, .5}, "
                  "scale in {.05, .1, .25, .5, 1}, d_model in {128, 256, 512}, n_heads in {1, 2, 4}, "
                  "num_pattern in {1, 2, 4}")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _scale(text: str) -> float | str:
    return "auto" if text.lower() in ("auto", "none") else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_argument_group("task")
    task.add_argument("--bag_size", type=training.positive_int, default=None,
                      help=f"instances per MNIST bag (default {DEFAULT_BAG_SIZE}; not with --k_mil)")
    task.add_argument("--k_mil", type=training.positive_int, default=None,
                      help="run K-MIL instead: a bag is positive iff it holds >= K nines (LeNet encoder)")
    task.add_argument("--modes", nargs="+", default=None,
                      help=f"retrieval maps, from {', '.join(sparsemax.MODES)}; 'name:param' sets k or alpha "
                           f"(default: {' '.join(DEFAULT_MODES)}; K-MIL: {' '.join(KMIL_DEFAULT_MODES)})")
    task.add_argument("--k", type=training.positive_int, default=None,
                      help=f"SparseMAP k of k_subsets modes without ':k' (default {DEFAULT_K})")
    task.add_argument("--alpha", type=training.positive_float, default=None,
                      help="alpha of entmax_alpha/normmax/gsh modes without ':alpha' (default: the map's)")
    task.add_argument("--seed", type=int, default=0, help="data seed; trial i trains with seed + i")
    task.add_argument("--quick", action="store_true",
                      help=f"smoke setting: {BAG_QUICK} (K-MIL: {KMIL_QUICK}); explicit flags still win")
    task.add_argument("--tune", action="store_true",
                      help=f"hyperparameter search instead of the fixed config: {TUNE_SPACE_DOC}")
    task.add_argument("--num_samples", type=training.positive_int, default=None,
                      help=f"configurations per mode with --tune (default {DEFAULT_NUM_SAMPLES})")
    hyper = parser.add_argument_group("hyperparameters (defaults depend on the task, see BAG_DEFAULTS/KMIL_DEFAULTS)")
    pos_int, pos_float = training.positive_int, training.positive_float
    for name, kind in (("n_train", pos_int), ("n_val", pos_int), ("n_test", pos_int), ("epochs", pos_int),
                       ("trials", pos_int), ("d_model", pos_int), ("n_heads", pos_int), ("num_pattern", pos_int),
                       ("update_steps", pos_int), ("dropout", training.probability), ("lr", pos_float),
                       ("weight_decay", training.nonnegative_float), ("batch_size", pos_int),
                       ("grad_clip", pos_float)):
        hyper.add_argument(f"--{name}", type=kind, default=None)
    hyper.add_argument("--scale", type=_scale, default=None, help="beta; 'auto' = 1/sqrt(d_model/n_heads)")
    run = parser.add_argument_group("computation")
    training.add_precision_arg(run)
    run.add_argument("--stack_seeds", default="off", choices=("on", "off"),
                     help="train the --trials seeds of a mode as one stacked model (batched_mil.train_stacked; each "
                          "seed's run equals its separate run; one trial file for all seeds); needs --num_pattern 1, "
                          "--update_steps 1, --train_metrics running, no --tune. Off by default: on this 2-core CPU "
                          "5 stacked K-MIL seeds train at 0.53x (fp32) / 0.84x (bf16) the bags/s of 5 separate runs "
                          "(bench/bench_engine.py; the LeNet convolutions, not per-step overhead, bound a step)")
    run.add_argument("--train_metrics", default="running", choices=training.TRAIN_METRICS,
                     help="train loss/accuracy per epoch: 'running' = mean over the epoch's mini-batches in train "
                          "mode (free), 'eval' = an extra eval-mode pass over the training bags (default running)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--img_dir", default=None, help="figures and per-epoch CSV (default imgs/; --quick: "
                                                     "results/quick/imgs/)")
    out.add_argument("--results_dir", default=None,
                     help="summary CSV/JSON, config, and the experiment's trial files under <exp_name>/trials/ "
                          "(default results/; --quick: results/quick/, which git ignores)")
    out.add_argument("--data_dir", default=None,
                     help="directory of the MNIST IDX files (default: the embedded datasets/data; checked by sha256)")
    out.add_argument("--tag", default=None,
                     help="name of the output files (default: the bag size, or kmil<K>), e.g. 5_fp32")
    out.add_argument("--report", action="store_true",
                     help="only rebuild the bag-size and K-MIL tables (<results_dir>/mnist_mil_table.md, "
                          "mnist_kmil_table.md) from the run summaries in <results_dir> "
                          "(default results/; the README's copies only from results/); takes only --results_dir")
    training.add_ray_args(parser, default_exp_name="auto")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset hyperparameters from the task's defaults (quick overrides first); expand and check the
    modes and the Ray settings (SystemExit naming the flag, before any work)."""
    training.check_ray_args(args)
    refuse_task_flags(args)
    args.bag_size, args.num_samples = args.bag_size or DEFAULT_BAG_SIZE, args.num_samples or DEFAULT_NUM_SAMPLES
    defaults = dict(KMIL_DEFAULTS if args.k_mil else {**BAG_DEFAULTS, **BAG_SIZE_DEFAULTS.get(args.bag_size, {})})
    if args.quick:
        defaults.update(KMIL_QUICK if args.k_mil else BAG_QUICK)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.scale == "auto":
        args.scale = None
    if args.modes is None:
        args.modes = list(KMIL_DEFAULT_MODES if args.k_mil else DEFAULT_MODES)
    try:
        refuse_map_flags(args)
        args.k = args.k or DEFAULT_K
        args.modes = [canonical_mode(spec, args.k, args.alpha) for spec in args.modes]
        for spec in args.modes:
            build_model({**defaults_for_check(args), "mode": spec})  # the map accepts its parameters
    except (ValueError, TypeError) as error:
        raise SystemExit(f"--modes: {error}")
    if len(set(args.modes)) != len(args.modes):
        raise SystemExit(f"--modes: duplicate modes {args.modes}")
    if args.d_model % args.n_heads:
        raise SystemExit(f"--d_model {args.d_model} must be divisible by --n_heads {args.n_heads}")
    stackable = (args.num_pattern == 1 and args.update_steps == 1 and not args.tune
                 and args.train_metrics == "running")
    args.stack_seeds = args.stack_seeds == "on"
    if args.stack_seeds and not stackable:
        raise SystemExit("--stack_seeds on needs --num_pattern 1, --update_steps 1 and --train_metrics running, "
                         "without --tune (the batched pooling and trainer of batched_mil); use --stack_seeds off")
    if args.tune:
        args.trials = 1
    try:
        args.precision = training.resolve_precision(args.precision, use_gpu=args.gpus_per_trial > 0)
    except ValueError as error:
        raise SystemExit(str(error))
    task_tag = f"kmil{args.k_mil}" if args.k_mil else str(args.bag_size)
    args.tag = args.tag or task_tag
    smoke = REPO_DIR / "results" / "quick"
    args.results_dir = args.results_dir or str(smoke if args.quick else COMMITTED_RESULTS)
    args.img_dir = args.img_dir or str(smoke / "imgs" if args.quick else REPO_DIR / "imgs")
    if args.data_dir is not None:
        import datasets

        try:  # a missing or corrupt file fails here, named, before any work
            datasets.load_mnist("train", args.data_dir), datasets.load_mnist("test", args.data_dir)
        except (OSError, ValueError, datasets.DataIntegrityError) as error:
            raise SystemExit(f"--data_dir {args.data_dir}: {error}")
    if args.exp_name == "auto":
        task = f"kmil{args.k_mil}" if args.k_mil else f"bag{args.bag_size}"
        args.exp_name = f"mnist_mil_{task}_{args.precision}" + ("_quick" if args.quick else "")
    return args


def defaults_for_check(args: argparse.Namespace) -> dict:
    """A tiny model config with the run's pooling settings, to validate a mode before any work."""
    return {"encoder": "mlp", "d_model": 2 * args.n_heads, "n_heads": args.n_heads, "num_pattern": 1,
            "update_steps": args.update_steps, "dropout": 0.0, "scale": None}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.report:
        return resolve_args(args)
    training.refuse_flags_besides(parser, args, "report", ("results_dir",), "rebuilds the tables from result files")
    args.results_dir = args.results_dir or str(COMMITTED_RESULTS)
    if not Path(args.results_dir).is_dir():
        parser.error(f"--results_dir {args.results_dir}: no such directory")
    return args


# Flags that do not change any trial's result (so they may differ on resume).
_NON_RESULT_FLAGS = {"ray_address", "cpus_per_trial", "gpus_per_trial", "gpus_id", "num_cpus", "exp_name",
                     "ray_dir", "img_dir", "results_dir", "quick", "tag", "data_dir", "report",
                     "stack_seeds"}  # stacked seeds equal separate runs (tested); their trial files differ anyway


def result_config(args: argparse.Namespace) -> dict:
    """The flags that determine the trials' results."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NON_RESULT_FLAGS}


# Flags that only choose which trials run (each trial's file has its own identity): an experiment may grow.
_TRIAL_SELECTION_FLAGS = {"modes", "trials", "num_samples", "k", "alpha"}


def experiment_settings(args: argparse.Namespace, digest: str) -> dict:
    """What every trial of an experiment shares: reopening it with other values is refused."""
    settings = {k: v for k, v in result_config(args).items() if k not in _TRIAL_SELECTION_FLAGS}
    return {**settings, "data": digest}


def data_digest(data: dict[str, dict]) -> str:
    """sha1 of every array of the built splits (images or bags, indices, labels, masks): the identity of
    the data a trial trains and is tested on."""
    digest = hashlib.sha1()
    for name in sorted(data):
        for key in sorted(data[name]):
            array = np.ascontiguousarray(data[name][key])
            digest.update(f"{name}/{key}/{array.dtype}/{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------
def parse_mode(spec: str) -> tuple[str, dict]:
    """'k_subsets:3' -> ('k_subsets', {'k': 3}); 'entmax_alpha:1.3' -> ('entmax_alpha', {'alpha': 1.3})."""
    name, _, param = spec.partition(":")
    if name not in sparsemax.MODES:
        raise ValueError(f"unknown mode {name!r}; choose from {', '.join(sparsemax.MODES)}")
    if not param:
        return name, {}
    if name not in MODE_PARAM:
        raise ValueError(f"mode {name!r} takes no parameter (got {spec!r})")
    key, kind = MODE_PARAM[name]
    try:
        return name, {key: kind(param)}
    except ValueError:
        raise ValueError(f"mode {spec!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {param!r}") from None


def refuse_task_flags(args: argparse.Namespace) -> None:
    """Flags the task would not read are errors (SystemExit): --num_samples without --tune; with --tune the
    hyperparameters it draws and --trials (one seed per draw); --bag_size with --k_mil (K-MIL bags vary)."""
    training.refuse_unused_flag("num_samples", args.num_samples, args.tune, "--tune")
    for name in (*TUNED, "trials"):
        training.refuse_unused_flag(name, getattr(args, name), not args.tune,
                                    f"runs without --tune (--tune draws {', '.join(TUNED)} and trains one seed each)")
    training.refuse_unused_flag("bag_size", args.bag_size, not args.k_mil,
                                f"MNIST bags, not --k_mil (K-MIL bag sizes are drawn: {KMIL_BAGS})")


def refuse_map_flags(args: argparse.Namespace) -> None:
    """--k / --alpha when no mode reads them: errors (SystemExit; an unknown mode name: ValueError from
    parse_mode)."""
    for param in ("k", "alpha"):
        users = sorted(name for name, (key, _) in MODE_PARAM.items() if key == param)
        reads = any(name in users and not params for name, params in map(parse_mode, args.modes))
        training.refuse_unused_flag(param, getattr(args, param), reads, f"--modes {' / '.join(users)} without "
                                    f"':{param}' (got --modes {' '.join(args.modes)})")


def canonical_mode(spec: str, k: int, alpha: float | None) -> str:
    """Spell out the default parameter of a mode: 'k_subsets' -> 'k_subsets:{k}' (validates the name)."""
    name, params = parse_mode(spec)
    if params or name not in MODE_PARAM:
        return spec
    key = MODE_PARAM[name][0]
    if key == "k":
        return f"{name}:{k}"
    return f"{name}:{alpha:g}" if alpha is not None else name


# --------------------------------------------------------------------------------------------------
# Data: built once in the driver, shipped to trials through Ray's object store
# --------------------------------------------------------------------------------------------------
class IndexedBags:
    """Fixed-size bags stored as indices into one image array: ``bags[i] = images[indices[i]]``.

    Quacks like the (n_bags, bag_size, 28, 28) tensor that ``training.iterate_batches`` slices, but
    gathers images per mini-batch, so 4000 bags of 100 digits cost 60000 images, not 400000.
    """

    def __init__(self, images: Tensor, indices: Tensor) -> None:
        self.images, self.indices = images, indices

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.indices.shape, *self.images.shape[1:]))

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, idx: Tensor | slice | int) -> Tensor:
        return self.images[self.indices[idx]]


def _compact(images: np.ndarray, indices: np.ndarray) -> dict:
    """Keep only the images some bag uses, and renumber the indices accordingly."""
    used = np.unique(indices)
    return {"images": np.ascontiguousarray(images[used]), "indices": np.searchsorted(used, indices)}


def build_bag_data(args: argparse.Namespace) -> dict[str, dict]:
    """MNIST bags: train from MNIST-train, test from MNIST-test (the seeds of ``datasets.mnist_bag_splits``);
    with ``--tune`` also validation bags from 10000 MNIST-train images that no training bag uses."""
    import datasets

    train_images, train_labels = datasets.load_mnist("train", args.data_dir)
    test_images, test_labels = datasets.load_mnist("test", args.data_dir)
    sample = datasets.sample_mnist_bag_indices
    pools = {"train": np.arange(len(train_labels))}
    if args.tune:
        perm = np.random.default_rng((args.seed, 2)).permutation(len(train_labels))
        pools = {"train": np.sort(perm[10_000:]), "val": np.sort(perm[:10_000])}
    data = {}
    for name, pool in pools.items():
        stream = {"train": 0, "val": 2}[name]
        idx, y = sample(train_labels[pool], getattr(args, f"n_{name}"), args.bag_size, seed=(args.seed, stream))
        data[name] = {**_compact(train_images, pool[idx]), "labels": y}
    idx, y = sample(test_labels, args.n_test, args.bag_size, seed=(args.seed, 1))
    data["test"] = {**_compact(test_images, idx), "labels": y}
    return data


def build_kmil_data(args: argparse.Namespace) -> dict[str, dict]:
    """K-MIL splits (``datasets.kmil_splits`` with Santos et al.'s bag sizes ``KMIL_BAGS``), zero-padded to
    the longest bag with a padding mask."""
    import datasets

    splits = datasets.kmil_splits(args.k_mil, seed=args.seed, data_dir=args.data_dir, n_train=args.n_train, n_val=args.n_val,
                                  n_test=args.n_test, **KMIL_BAGS)
    data = {}
    for name, (bags, labels) in splits.items():
        padded, mask = datasets.pad_bags(bags)
        data[name] = {"bags": padded, "mask": mask, "labels": labels}
    return data


def split_tensors(split: dict, dtype: torch.dtype = torch.float32) -> tuple[Any, Tensor | None, Tensor]:
    """(bags, key_padding_mask or None, labels) as ``training.train_bag_classifier`` expects; images in ``dtype``."""
    labels = torch.as_tensor(split["labels"])
    if "indices" in split:
        return IndexedBags(torch.tensor(split["images"], dtype=dtype), torch.as_tensor(split["indices"])), None, labels
    return torch.tensor(split["bags"], dtype=dtype), torch.as_tensor(split["mask"]), labels


def image_dtype(precision: str) -> torch.dtype:
    """Dtype the images are stored in for a trial: autocast's low-precision dtype under bf16/fp16, since both
    encoders (``mlp_encoder``: Linear; ``lenet_encoder``: Conv2d) begin with an op that autocast casts to it
    anyway: the same values, without casting every mini-batch again (and half the bytes gathered)."""
    return training.autocast_dtype(precision)


# --------------------------------------------------------------------------------------------------
# Model and trial
# --------------------------------------------------------------------------------------------------
def lenet_encoder(d_model: int, layout: str = "fast") -> nn.Module:
    """LeNet-style instance encoder (Ilse et al. 2018): (n, 28, 28) -> conv5-pool-conv5-pool -> Linear+ReLU (n, d_model).

    ``layout="textbook"``: conv - ReLU - max-pool 2, contiguous (NCHW) weights. ``"fast"`` (default): conv - max-pool
    2 - ReLU (the same values and gradients: ReLU is monotone, so it commutes with max; on a 4x smaller tensor) with
    channels-last conv weights, so oneDNN runs the convs and pools in NHWC (``bench/bench_lenet.py``: ratio measured
    in one process); the flattened features keep ``nn.Flatten``'s channel-major order."""
    if layout not in ("fast", "textbook"):
        raise ValueError(f"layout {layout!r}: choose fast or textbook")

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        act_pool = [nn.ReLU(), nn.MaxPool2d(2)] if layout == "textbook" else [nn.MaxPool2d(2), nn.ReLU()]
        return [nn.Conv2d(c_in, c_out, kernel_size=5), *act_pool]

    encoder = nn.Sequential(nn.Unflatten(1, (1, 28)), *block(1, 20), *block(20, 50),
                            nn.Flatten(), nn.Linear(50 * 4 * 4, d_model), nn.ReLU())
    return encoder.to(memory_format=torch.channels_last) if layout == "fast" else encoder


def build_model(config: dict) -> training.BagClassifier:
    """Bag classifier of a trial config (keys: mode, encoder, d_model, n_heads, num_pattern, scale, ...)."""
    mode, map_params = parse_mode(config["mode"])
    if config["encoder"] == "lenet":
        encoder = lenet_encoder(config["d_model"])
    else:
        encoder = training.mlp_encoder(28 * 28, config["d_model"])
    return training.BagClassifier(encoder, config["d_model"], num_pattern=config["num_pattern"],
                                  n_heads=config["n_heads"], mix=True, update_steps=config["update_steps"],
                                  dropout=config["dropout"], mode=mode, scale=config["scale"], **map_params)


def run_trial(config: dict, data: dict, report) -> list[dict]:
    """Train one model; ``report`` gets each epoch's metrics (plus val_loss/val_acc when data has 'val')."""
    device = training.trial_device(config)
    training.seed_everything(config["seed"])
    splits = {name: split_tensors(split, image_dtype(config["precision"])) for name, split in data.items()}
    model = build_model(config)

    def report_epoch(metrics: dict) -> None:
        if "val" in splits:
            val = training.evaluate_bags(model, *splits["val"], batch_size=config["batch_size"],
                                         precision=config["precision"])
            metrics.update(val_loss=val["loss"], val_acc=val["acc"])
        report(metrics)

    return training.train_bag_classifier(
        model, splits["train"], splits["test"], epochs=config["epochs"], lr=config["lr"],
        weight_decay=config["weight_decay"], batch_size=config["batch_size"], grad_clip=config["grad_clip"],
        seed=config["seed"], report=report_epoch, device=device, precision=config["precision"],
        train_metrics=config["train_metrics"])


def run_stacked_trial(config: dict, data: dict, report) -> list[list[dict]]:
    """Train the seeds ``config["seeds"]`` of one mode as one stacked model (``batched_mil.train_stacked``):
    model m is initialized as ``build_model`` after ``seed_everything(seeds[m])``."""
    import batched_mil

    device = training.trial_device(config)
    models = []
    for seed in config["seeds"]:
        training.seed_everything(seed)
        models.append(build_model(config))
    d = config["d_model"]
    lenet = config["encoder"] == "lenet"
    shape = batched_mil.Shape(d_in=batched_mil.LENET_FEATURES if lenet else 28 * 28, emb_dims=d, emb_layers=1,
                              width=d, n_heads=config["n_heads"], emb_proj=not lenet, lenet=lenet)
    if not lenet:
        raise ValueError("stacked seeds are implemented for the LeNet encoder (K-MIL)")
    model = batched_mil.BatchedBagClassifier.from_models(models, shape).to(device)
    splits = {name: split_tensors(split, image_dtype(config["precision"])) for name, split in data.items()}
    return batched_mil.train_stacked(
        model, splits["train"], {name: splits[name] for name in ("val", "test") if name in splits},
        seeds=config["seeds"], epochs=config["epochs"], lr=config["lr"], weight_decay=config["weight_decay"],
        batch_size=config["batch_size"], grad_clip=config["grad_clip"], precision=config["precision"],
        report=report)


def train_trial(config: dict, data: dict) -> None:
    """Ray Tune trainable: one (mode, seed[, hyperparameters]) trial, or one mode's stacked seeds; one
    report per epoch."""
    from ray import tune

    if "seeds" in config:
        run_stacked_trial(config, data, tune.report)
        return
    run_trial(config, data, tune.report)


def trial_configs(args: argparse.Namespace, digest: str) -> list[dict]:
    """Every trial: mode x seed (or mode x ``--num_samples`` sampled hyperparameters with --tune). Each
    config holds everything its result depends on, the data's digest included (its trial file's identity)."""
    fixed = {name: getattr(args, name) for name in
             ("epochs", "d_model", "n_heads", "num_pattern", "scale", "update_steps", "dropout", "lr",
              "weight_decay", "batch_size", "grad_clip", "precision", "train_metrics")}
    fixed.update(encoder="lenet" if args.k_mil else "mlp", data=digest)
    samples = [{}]
    if args.tune:
        rng = np.random.default_rng((args.seed, 3))
        samples = [sample_tune_space(rng) for _ in range(args.num_samples)]
    seeds = [args.seed + i for i in range(args.trials)]
    if args.stack_seeds:
        return [{**fixed, "mode": mode, "seeds": seeds} for mode in args.modes]
    return [{**fixed, **sample, "mode": mode, "seed": seed} for mode in args.modes for sample in samples for seed in seeds]


def trial_label(config: dict) -> str:
    """Readable part of a trial file's name: mode and seed(s)."""
    seeds = config["seeds"] if "seeds" in config else [config["seed"]]
    span = f"seed{seeds[0]}" if len(seeds) == 1 else f"seeds{seeds[0]}-{seeds[-1]}"
    return f"{config['mode'].replace(':', '-')}_{span}"


def per_seed_trials(trials: list[dict]) -> list[dict]:
    """Stacked trials (config with ``seeds``) as one trial per seed, as if each had run alone."""
    out = []
    for trial in trials:
        if "seeds" not in trial["config"]:
            out.append(trial)
            continue
        base = {k: v for k, v in trial["config"].items() if k != "seeds"}
        for i, seed in enumerate(trial["config"]["seeds"]):
            history = [report["per_seed"][i] for report in trial["history"]]
            out.append({**trial, "config": {**base, "seed": seed}, "history": history,
                        "metrics": history[-1] if history else {}, "stacked_with": trial["config"]["seeds"]})
    return out


# --------------------------------------------------------------------------------------------------
# Results: tables, summaries, plots
# --------------------------------------------------------------------------------------------------
_HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc")


def epoch_records(trials: list[dict]) -> list[dict]:
    """One row per (trial, epoch): mode, seed, trial index, the trial's tuned values, the metrics."""
    rows = []
    order = sorted(trials, key=lambda t: json.dumps(t["config"], sort_keys=True, default=str))
    for trial_index, trial in enumerate(order):
        config = trial["config"]
        for h in sorted(trial["history"], key=lambda r: r["epoch"]):
            row = {"mode": config["mode"], "seed": config["seed"], "trial": trial_index}
            row.update({k: config[k] for k in ("lr", "weight_decay", "dropout", "scale", "d_model", "n_heads",
                                               "num_pattern")})
            row.update({k: h[k] for k in _HISTORY_KEYS if k in h})
            rows.append(row)
    return rows


def select_epoch(rows: list[dict], by_validation: bool) -> dict:
    """The reported epoch of one trial: best validation accuracy (first on ties) or the last epoch."""
    if by_validation:
        return max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    return max(rows, key=lambda r: r["epoch"])


def summarize(records: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per mode: test accuracy mean +- std (population std over seeds) of the selected epochs.

    Fixed config: one trial per seed. ``--tune``: per mode the sampled config with the best selected
    validation accuracy (its test accuracy is then a single-seed number).
    """
    import pandas as pd

    frame = pd.DataFrame(records)
    by_validation = "val_acc" in frame.columns
    summary = []
    for mode in args.modes:
        rows = frame[frame["mode"] == mode]
        selected = [select_epoch(group.to_dict("records"), by_validation) for _, group in rows.groupby("trial")]
        if args.tune:
            selected = [max(selected, key=lambda r: (r["val_acc"], -r["trial"]))]
        accs = np.array([r["test_acc"] for r in selected])
        entry = {"mode": mode, "test_acc_mean": float(accs.mean()), "test_acc_std": float(accs.std()),
                 "n_trials": len(accs), "epochs": [int(r["epoch"]) for r in selected],
                 "test_acc_per_trial": accs.tolist(),
                 "selection": "best validation epoch" if by_validation else "last epoch"}
        if by_validation:
            entry["val_acc_mean"] = float(np.mean([r["val_acc"] for r in selected]))
        else:  # one fixed config: the seed-mean learning curve (epochs 1..E), for the report's learning-speed table
            entry["test_acc_mean_curve"] = rows.groupby("epoch")["test_acc"].mean().round(6).tolist()
        if args.tune:
            entry["best_config"] = {k: selected[0][k] for k in ("lr", "weight_decay", "dropout", "scale", "d_model",
                                                                "n_heads", "num_pattern")}
        reference = reference_accuracy(mode, args.k_mil)
        if reference is not None:
            entry["santos2024_test_acc"] = reference
        summary.append(entry)
    return summary


def reference_accuracy(mode: str, k_mil: int | None) -> float | None:
    """Santos et al. (2024) K-MIL accuracy (%) for a k_subsets mode, if the paper reports it."""
    name, params = parse_mode(mode)
    if k_mil is None or name != "k_subsets":
        return None
    return SANTOS_KMIL_SPARSEMAP.get(params.get("k"), {}).get(k_mil)


def format_table(summary: list[dict], title: str) -> str:
    """Markdown table: mode | test acc (%) mean +- std | trials [| Santos et al. 2024]."""
    with_reference = any("santos2024_test_acc" in s for s in summary)
    head = "| mode | test acc (%) | trials |" + (" Santos et al. 2024 (%) |" if with_reference else "")
    lines = [title, "", head, "|" + "---|" * (4 if with_reference else 3)]
    for s in summary:
        line = f"| {s['mode']} | {100 * s['test_acc_mean']:.1f} +- {100 * s['test_acc_std']:.1f} | {s['n_trials']} |"
        if with_reference:
            ref = s.get("santos2024_test_acc")
            line += f" {ref:.1f} |" if ref is not None else " - |"
        lines.append(line)
    return "\n".join(lines)


def plot_mean_std(curves: dict[str, np.ndarray], xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """One line per label: mean over rows of a (n_runs, n_points) array, with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    training.draw_mean_std(ax, curves)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(records: list[dict], args: argparse.Namespace) -> list[Path]:
    """``{img_dir}/{metric}_{tag}.png`` for each metric in METRICS (and val_acc when present)."""
    import pandas as pd

    frame = pd.DataFrame(records)
    task = f"K-MIL, K={args.k_mil}" if args.k_mil else f"MNIST bags, bag size {args.bag_size}"
    paths = []
    for metric in METRICS + (("val_acc",) if "val_acc" in frame.columns else ()):
        curves = {}
        for mode in args.modes:
            pivot = frame[frame["mode"] == mode].pivot(index="trial", columns="epoch", values=metric)
            curves[mode] = pivot.to_numpy()
        split, kind = metric.split("_")
        ylabel = f"{split} {'accuracy' if kind == 'acc' else 'BCE loss'}"
        how = f"\n{split}: {training.TRAIN_METRICS_DOC[args.train_metrics]}" if split == "train" else ""
        path = Path(args.img_dir) / f"{metric}_{args.tag}.png"
        plot_mean_std(curves, "epoch", ylabel, f"{task}, {args.precision}: {ylabel} (mean +- std over trials){how}",
                      path)
        paths.append(path)
    return paths


def write_outputs(records: list[dict], summary: list[dict], args: argparse.Namespace,
                  trials: list[dict]) -> dict[str, Path]:
    import pandas as pd

    img_dir, results_dir = Path(args.img_dir), Path(args.results_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics_csv": img_dir / f"metrics_{args.tag}.csv",
             "summary_csv": results_dir / f"mnist_mil_{args.tag}_summary.csv",
             "summary_json": results_dir / f"mnist_mil_{args.tag}_summary.json"}
    pd.DataFrame(records).to_csv(files["metrics_csv"], index=False)
    flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in s.items()
             if k != "test_acc_mean_curve"} for s in summary]  # the curves: metrics_csv, per trial
    pd.DataFrame(flat).to_csv(files["summary_csv"], index=False)
    payload = {"config": result_config(args), "exp_name": args.exp_name, "summary": summary,
               "provenance": training.trial_provenance(trials), "train_metrics": training.TRAIN_METRICS_DOC[args.train_metrics]}
    files["summary_json"].write_text(json.dumps(payload, indent=2, default=str))
    for i, path in enumerate(plot_curves(records, args)):
        files[f"plot_{i}"] = path
    return files


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
# Final test accuracy read off Hu et al.'s committed figures (approximate; their four curves all ran softmax).
HU_FIGURES_APPROX = {5: {mode: "0.93-0.95" for mode in DEFAULT_MODES},
                     20: {"sparsemax": "0.91-0.92", "softmax": "0.88-0.89"}}


def load_bag_summaries(results_dir: Path) -> dict[str, dict]:
    """tag -> summary payload of every ``mnist_mil_<tag>_summary.json`` of the bag task."""
    out = {}
    for path in sorted(results_dir.glob("mnist_mil_*_summary.json")):
        payload = json.loads(path.read_text())
        if "provenance" not in payload:
            print(f"skipping {training.repo_relative(path)}: written before results recorded precision and time")
        elif payload["config"].get("k_mil") is None:
            out[path.name[len("mnist_mil_"):-len("_summary.json")]] = payload
    return out


def _wall_clock(prov: dict) -> str:
    """A sweep's wall clock in hours (``training.sweep_wall_clock_s``: time during which a trial ran)."""
    wall = prov.get("wall_clock_s")
    return "–" if wall is None else f"{wall / 3600:.2f}"


def _cell(entry: dict) -> str:
    return f"{entry['test_acc_mean']:.3f} ± {entry['test_acc_std']:.3f}"


def sparse_minus_softmax(by_mode: dict[str, dict]) -> str:
    """Best sparse mode's mean test accuracy minus softmax's, and whether the gap exceeds the larger std."""
    sparse = [by_mode[m] for m in DEFAULT_MODES if m != "softmax" and m in by_mode]
    if "softmax" not in by_mode or not sparse:
        return "–"
    best, dense = max(sparse, key=lambda s: s["test_acc_mean"]), by_mode["softmax"]
    gap = best["test_acc_mean"] - dense["test_acc_mean"]
    beyond = abs(gap) > max(best["test_acc_std"], dense["test_acc_std"])
    return f"{gap:+.3f} ({best['mode']}; {'beyond' if beyond else 'within'} one std)"


LEARNING_SPEED_ACC = 0.75  # the report's learning-speed threshold (below every final accuracy measured so far)


def first_epoch_reaching(curve: Sequence[float], threshold: float) -> int | None:
    """First epoch (1-based) at which a seed-mean test-accuracy curve reaches ``threshold``; None if never."""
    return next((epoch for epoch, acc in enumerate(curve, start=1) if acc >= threshold), None)


def learning_speed_table(canonical: dict[str, dict]) -> list[str]:
    """Markdown lines: bag sizes x modes, the first epoch at which the seed-mean test accuracy reaches
    ``LEARNING_SPEED_ACC`` (from each summary's ``test_acc_mean_curve``)."""
    lines = ["", f"Learning speed: first epoch at which the mean test accuracy over seeds reaches {LEARNING_SPEED_ACC} "
             "('>E': not within the E epochs):", "", "| bag size | " + " | ".join(DEFAULT_MODES) + " |",
             "|---" * (len(DEFAULT_MODES) + 1) + "|"]
    for tag in sorted(canonical, key=int):
        by_mode = {s["mode"]: s for s in canonical[tag]["summary"] if "test_acc_mean_curve" in s}
        if not by_mode:
            continue
        cells = []
        for mode in DEFAULT_MODES:
            curve = by_mode[mode]["test_acc_mean_curve"] if mode in by_mode else None
            epoch = None if curve is None else first_epoch_reaching(curve, LEARNING_SPEED_ACC)
            cells.append("–" if curve is None else (str(epoch) if epoch else f">{len(curve)}"))
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return lines


def bag_report(results_dir: Path) -> str:
    """Markdown: bag sizes x modes, final-epoch test accuracy (mean ± std over seeds) with the best sparse mode's
    gap to softmax, precision, epochs, seeds and summed trial time; then the values read off Hu et al.'s
    figures; then fp32-vs-bf16 rows."""
    summaries = load_bag_summaries(results_dir)
    canonical = {t: p for t, p in summaries.items() if t.isdigit()}
    lines = ["| bag size | " + " | ".join(DEFAULT_MODES) + " | best sparse - softmax | precision | epochs x seeds | "
             "trial time (h) | wall clock (h) | Hu et al. figures (approx.) |", "|---" * (len(DEFAULT_MODES) + 7) + "|"]
    walls = []
    for tag in sorted(canonical, key=int):
        payload = canonical[tag]
        by_mode = {s["mode"]: s for s in payload["summary"]}
        prov, config = payload["provenance"], payload["config"]
        ref = HU_FIGURES_APPROX.get(int(tag), {})
        refs = ", ".join(f"{m} ~{v}" for m, v in ref.items()) if len(set(ref.values())) > 1 else \
            (f"all ~{next(iter(ref.values()))}" if ref else "–")
        lines.append(f"| {tag} | " + " | ".join(_cell(by_mode[m]) if m in by_mode else "–" for m in DEFAULT_MODES)
                     + f" | {sparse_minus_softmax(by_mode)} | {', '.join(prov['precision'])} | {config['epochs']} x {config['trials']} | "
                       f"{prov['trial_wall_time_s']['sum'] / 3600:.1f} | {_wall_clock(prov)} | {refs} |")
        walls.append(prov.get("wall_clock_s"))
    if walls and all(w is not None for w in walls):
        lines += ["", f"Wall clock of the {len(walls)} bag sizes above on this machine's 2 cores (2 trials in parallel): "
                  f"{sum(walls) / 3600:.1f} h in all."]
    lines += learning_speed_table(canonical)
    checks = [(t, p) for t, p in summaries.items() if not t.isdigit() and t.split("_")[0] in canonical]
    if checks:
        lines += ["", "Precision check (same protocol, other precision; 'within' = |difference| <= the larger std):", "",
                  "| bag size | mode | " + " | ".join(["canonical", "check", "within one std"]) + " |",
                  "|---|---|---|---|---|"]
        for tag, payload in checks:
            base = {s["mode"]: s for s in canonical[tag.split("_")[0]]["summary"]}
            for s in payload["summary"]:
                b = base.get(s["mode"])
                if b is None:
                    continue
                within = abs(s["test_acc_mean"] - b["test_acc_mean"]) <= max(s["test_acc_std"], b["test_acc_std"])
                lines.append(f"| {tag.split('_')[0]} | {s['mode']} | {_cell(b)} ({', '.join(canonical[tag.split('_')[0]]['provenance']['precision'])}) "
                             f"| {_cell(s)} ({', '.join(payload['provenance']['precision'])}) | {'yes' if within else 'no'} |")
    return "\n".join(lines)


def load_kmil_summaries(results_dir: Path) -> dict[int, dict]:
    """K -> summary payload of ``mnist_mil_kmil<K>_summary.json`` (the default tag of ``--k_mil K``)."""
    out = {}
    for path in sorted(results_dir.glob("mnist_mil_kmil*_summary.json")):
        payload = json.loads(path.read_text())
        k_mil = payload["config"].get("k_mil")
        if "provenance" in payload and k_mil is not None and path.name == f"mnist_mil_kmil{k_mil}_summary.json":
            out[int(k_mil)] = payload
    return out


KMIL_KS = (2, 3, 5)  # Santos et al.'s K values; the published-protocol experiments are mnist_mil_kmil<K>_fp32
KMIL_COMMAND = "for K in 2 3 5; do python3 mnist_mil_main.py --k_mil $K --precision fp32; done"


def published_kmil(mode: str, ks: Sequence[int]) -> str:
    """Santos et al.'s SparseMAP accuracy ± std for a k_subsets mode at each K ("–" where not published)."""
    name, params = parse_mode(mode)
    ref = SANTOS_KMIL_SPARSEMAP.get(params.get("k")) if name == "k_subsets" else None
    if not ref:
        return "–"
    return " / ".join(f"{ref[k]} ± {SANTOS_KMIL_SPARSEMAP_STD[params['k']][k]}" if k in ref else "–" for k in ks)


def kmil_progress(results_dir: Path, skip: Sequence[int] = ()) -> str:
    """Markdown: the K-MIL experiments ``<results_dir>/mnist_mil_kmil<K>_fp32/`` without a summary yet (K not in
    ``skip``), from their committed trial files: per mode the seeds finished so far and their test accuracy (%)
    at the best-validation epoch (``summarize``'s selection), so a reader sees a partial sweep as partial."""
    n_seeds = KMIL_DEFAULTS["trials"]
    lines = []
    for k in (k for k in KMIL_KS if k not in skip):
        experiment = results_dir / f"mnist_mil_kmil{k}_fp32"
        files = sorted((experiment / "trials").glob("*.json"))
        if not files:
            continue
        settings = json.loads((experiment / "experiment.json").read_text())
        trials = per_seed_trials([json.loads(path.read_text()) for path in files])
        modes = [m for m in KMIL_DEFAULT_MODES if any(t["config"]["mode"] == m for t in trials)]
        modes += sorted({t["config"]["mode"] for t in trials} - set(modes))
        summary = summarize(epoch_records(trials), argparse.Namespace(modes=modes, tune=False, k_mil=k))
        for entry in summary:
            accuracy = f"{100 * entry['test_acc_mean']:.1f}"
            if entry["n_trials"] > 1:  # one seed has no spread
                accuracy += f" ± {100 * entry['test_acc_std']:.1f}"
            lines.append(f"| {k} | {entry['mode']} | {entry['n_trials']} of {n_seeds} | {settings['epochs']} | "
                         f"{accuracy} | "
                         f"{', '.join(f'{100 * a:.1f}' for a in entry['test_acc_per_trial'])} | "
                         f"{', '.join(map(str, entry['epochs']))} | {published_kmil(entry['mode'], [k])} |")
    if not lines:
        return ""
    head = ["In progress (`mnist_mil_kmil<K>_fp32/trials/`, the seeds finished so far; a K enters the K-MIL table "
            f"when its command has run all {len(KMIL_DEFAULT_MODES)} modes x {n_seeds} seeds):", "",
            "| K | mode | seeds done | epochs | test acc % at best-val epoch, so far | per seed | best-val epochs "
            "| Santos et al. 2024 |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines)


def kmil_against_published(by_k: dict[int, dict[str, dict]]) -> list[str]:
    """Markdown lines: each (K, k_subsets:k) row that Santos et al. publish, ours - theirs (points of accuracy)
    and whether |ours - theirs| <= the larger of the two stds."""
    lines = ["", "Against Santos et al.'s SparseMAP rows ('within' = |ours - theirs| <= the larger std):", "",
             "| K | mode | ours | Santos et al. | ours - theirs | within one std |", "|---|---|---|---|---|---|"]
    for k, modes in by_k.items():
        for mode, s in modes.items():
            ref = reference_accuracy(mode, k)
            if ref is None:
                continue
            ref_std = SANTOS_KMIL_SPARSEMAP_STD[parse_mode(mode)[1]["k"]][k]
            ours, ours_std = 100 * s["test_acc_mean"], 100 * s["test_acc_std"]
            within = abs(ours - ref) <= max(ours_std, ref_std)
            lines.append(f"| {k} | {mode} | {ours:.1f} ± {ours_std:.1f} | {ref} ± {ref_std} | {ours - ref:+.1f} | "
                         f"{'yes' if within else 'no'} |")
    return lines


def kmil_report(results_dir: Path) -> str:
    """Markdown: K-MIL modes x K, test accuracy (%) at the best-validation epoch (mean ± std over seeds), beside
    Santos et al.'s SparseMAP rows; their differences (``kmil_against_published``); then per K the precision,
    epochs x seeds and summed trial time; then the
    K-MIL experiments still in progress (``kmil_progress``)."""
    summaries = load_kmil_summaries(results_dir)
    progress = kmil_progress(results_dir, skip=list(summaries))
    if not summaries:
        return "\n\n".join(filter(None, [f"No K-MIL table yet (`{KMIL_COMMAND}`).", progress]))
    ks = sorted(summaries)
    by_k = {k: {s["mode"]: s for s in summaries[k]["summary"]} for k in ks}
    modes = list(KMIL_DEFAULT_MODES) + sorted({m for k in ks for m in by_k[k]} - set(KMIL_DEFAULT_MODES))
    lines = ["| mode | " + " | ".join(f"K = {k}" for k in ks) + " | Santos et al. 2024 (" +
             " / ".join(f"K = {k}" for k in ks) + ") |", "|---" * (len(ks) + 2) + "|"]
    for mode in modes:
        cells = [f"{100 * by_k[k][mode]['test_acc_mean']:.1f} ± {100 * by_k[k][mode]['test_acc_std']:.1f}"
                 if mode in by_k[k] else "–" for k in ks]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {published_kmil(mode, ks)} |")
    lines += kmil_against_published(by_k)
    lines += ["", "| K | precision | epochs x seeds | trial time (h) |", "|---|---|---|---|"]
    for k in ks:
        prov, config = summaries[k]["provenance"], summaries[k]["config"]
        lines.append(f"| {k} | {', '.join(prov['precision'])} | {config['epochs']} x {config['trials']} | "
                     f"{prov['trial_wall_time_s']['sum'] / 3600:.1f} |")
    return "\n\n".join(filter(None, ["\n".join(lines), progress]))


def write_bag_report(results_dir: Path) -> str:
    """The bag-size table (and the K-MIL table) into ``results_dir``; into the README's blocks only from the
    committed results/ (a smoke run's tables never replace them)."""
    table, kmil = bag_report(results_dir), kmil_report(results_dir)
    (results_dir / "mnist_mil_table.md").write_text(table + "\n")
    (results_dir / "mnist_kmil_table.md").write_text(kmil + "\n")
    committed = results_dir.resolve() == COMMITTED_RESULTS.resolve()
    in_readme = committed and training.write_readme_block("mnist_mil_table", table)
    if in_readme:
        training.write_readme_block("kmil_table", kmil)
    print(table + "\n\n" + kmil + f"\n\nwrote {training.repo_relative(results_dir / 'mnist_mil_table.md')}, "
          f"{training.repo_relative(results_dir / 'mnist_kmil_table.md')}" + (" and the README's tables" if in_readme else ""))
    return table


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the trials that have no trial file yet, write figures/CSV/JSON, print the table; returns
    ``{"summary": [...], "files": {...}, "trials": [...]}``. ``--report``: only the bag-size table."""
    args = parse_args(argv)
    if args.report:
        return {"table": write_bag_report(Path(args.results_dir))}
    config = training.log_config(args, Path(args.results_dir) / f"mnist_mil_{args.tag}_config.json")
    training.seed_everything(args.seed)
    data = build_kmil_data(args) if args.k_mil else build_bag_data(args)
    digest = data_digest(data)
    trial_dir = training.open_experiment(Path(args.results_dir) / args.exp_name, experiment_settings(args, digest))
    sizes = {name: len(split["labels"]) for name, split in data.items()}
    print(f"bags per split: {sizes}; precision {args.precision}; experiment {training.repo_relative(trial_dir)}")
    trials = per_seed_trials(training.run_trials(train_trial, trial_configs(args, digest), args, trial_dir,
                                                 label=trial_label, params={"data": data}))
    records = epoch_records(trials)
    summary = summarize(records, args)
    files = write_outputs(records, summary, args, trials)
    task = f"K-MIL K={args.k_mil}" if args.k_mil else f"MNIST bags, bag size {args.bag_size}"
    selection = summary[0]["selection"] if summary else ""
    print("\n" + format_table(summary, f"{task} ({selection}, {args.precision}, mean +- std over trials)"))
    print("\nwrote:\n" + "\n".join(f"  {training.repo_relative(path)}" for path in files.values()))
    return {"summary": summary, "files": files, "trials": trials, "args": args, "config": config}


if __name__ == "__main__":
    main(sys.argv[1:])
