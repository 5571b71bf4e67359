"""Shared experiment machinery: Ray Tune trials, seeding, and the bag-classifier model and training loop.

Every experiment script (``mnist_mil_main.py``, ``real_world_mil.py``, ``bit_pattern.py``,
``hopfield_deq.py``) runs its trials through ``run_trials`` so that the same flags scale a sweep from
a laptop to a cluster (``--ray_address``) and an interrupted run resumes by rerunning with the same
``--exp_name``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers import HopfieldPooling

REPO_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------
# Reproducibility and CLI
# --------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_ray_args(parser: argparse.ArgumentParser, default_exp_name: str) -> argparse.ArgumentParser:
    """Add the Ray flags shared by every experiment script."""
    group = parser.add_argument_group("ray")
    group.add_argument("--ray_address", default=None,
                       help="address of an existing Ray cluster (e.g. 'auto' or 'ray://host:10001'); "
                            "default: start a local Ray")
    group.add_argument("--cpus_per_trial", type=float, default=1, help="CPUs reserved per trial")
    group.add_argument("--gpus_per_trial", type=float, default=0, help="GPUs reserved per trial")
    group.add_argument("--gpus_id", default=None,
                       help="comma-separated GPU ids visible to Ray (sets CUDA_VISIBLE_DEVICES)")
    group.add_argument("--num_cpus", type=int, default=None,
                       help="CPUs a local Ray may use (default: all); ignored with --ray_address")
    group.add_argument("--exp_name", default=default_exp_name,
                       help="experiment name; rerunning with the same name resumes it")
    group.add_argument("--ray_dir", default=str(REPO_DIR / "results" / "ray"),
                       help="where Ray Tune keeps trial state (for resuming)")
    return parser


def log_config(args: argparse.Namespace, path: Path | None = None) -> dict:
    """Print the run's configuration and, if ``path`` is given, write it there as JSON."""
    config = vars(args).copy()
    print("config:", json.dumps(config, sort_keys=True, default=str))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return config


def init_ray(args: argparse.Namespace) -> None:
    """Connect to ``--ray_address`` or start a local Ray (no-op if Ray is already running here)."""
    import ray

    if args.gpus_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus_id
    if ray.is_initialized():
        return
    if args.ray_address:  # ship this repo's code and embedded data to the cluster's workers
        runtime_env = {"working_dir": str(REPO_DIR),
                       "excludes": [".venv/", ".git/", "results/", "imgs/", "**/__pycache__/"]}
        ray.init(address=args.ray_address, runtime_env=runtime_env, log_to_driver=False)
    else:  # local workers import the repo's modules from here
        pythonpath = os.pathsep.join(filter(None, [str(REPO_DIR), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})


def trial_device(config: dict) -> torch.device:
    """Device of a trial: CUDA when Ray gave it a GPU, else CPU; also caps torch's CPU threads."""
    torch.set_num_threads(max(1, int(config.get("cpus_per_trial", 1))))
    return torch.device("cuda" if torch.cuda.is_available() and config.get("gpus_per_trial", 0) > 0
                        else "cpu")


def run_trials(trainable: Callable[[dict], Any], param_space: dict, args: argparse.Namespace,
               metric: str | None = None, mode: str = "max", num_samples: int = 1,
               search_alg: Any = None) -> list[dict]:
    """Run ``trainable`` as Ray Tune trials over ``param_space`` and return one dict per trial:
    ``{"config": ..., "metrics": last reported metrics, "history": [per-report metrics]}``.

    Trials report with ``ray.tune.report(dict)`` (e.g. once per epoch). Rerunning with the same
    ``args.exp_name`` restores the experiment: finished trials are kept, unfinished and errored ones
    rerun. ``cpus_per_trial``/``gpus_per_trial`` are put into each trial's config for ``trial_device``.
    """
    from ray import tune

    init_ray(args)
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    param_space = {**param_space, "cpus_per_trial": args.cpus_per_trial,
                   "gpus_per_trial": args.gpus_per_trial}
    storage = Path(args.ray_dir).resolve()
    experiment_dir = storage / args.exp_name
    resourced = tune.with_resources(trainable, resources)
    if tune.Tuner.can_restore(str(experiment_dir)):
        print(f"resuming experiment {experiment_dir}")
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=resourced, resume_errored=True,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            resourced, param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=num_samples, search_alg=search_alg,
                                        metric=metric if search_alg else None,
                                        mode=mode if search_alg else None),
            run_config=tune.RunConfig(name=args.exp_name, storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=1)))
    grid = tuner.fit()
    trials = []
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"trial {result.path} failed: {result.error}")
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        trials.append({"config": result.config, "metrics": result.metrics, "history": history})
    return trials


# --------------------------------------------------------------------------------------------------
# Bag classifier (multiple-instance learning) and its training loop
# --------------------------------------------------------------------------------------------------
class BagClassifier(nn.Module):
    """instances -> encoder -> LayerNorm -> HopfieldPooling -> GELU -> LayerNorm -> Linear -> 1 logit.

    The classifier of Hu et al. (2023) for MNIST bags with a pluggable instance encoder
    (``encoder`` maps (B*N, ...) instances to (B*N, d_model)). ``pooling_kwargs`` go to
    ``HopfieldPooling`` (n_heads, mix, update_steps, dropout, mode, scale, num_pattern, alpha, k, ...).
    """

    def __init__(self, encoder: nn.Module, d_model: int, num_pattern: int = 1, **pooling_kwargs) -> None:
        super().__init__()
        self.encoder = encoder
        self.norm_in = nn.LayerNorm(d_model)
        self.pooling = HopfieldPooling(d_model, num_pattern=num_pattern, **pooling_kwargs)
        self.norm_out = nn.LayerNorm(num_pattern * d_model)
        self.head = nn.Linear(num_pattern * d_model, 1)

    def encode(self, instances: Tensor, padding: Tensor | None = None) -> Tensor:
        """Encoder output for (M, ...) instances; padded ones (``padding`` (M,) True) are not encoded
        and get a zero embedding (the pooling gives them weight exactly 0 anyway)."""
        if padding is None or not bool(padding.any()):
            return self.encoder(instances)
        real = (~padding).nonzero().squeeze(1)
        embedded = self.encoder(instances[real])
        return embedded.new_zeros(instances.shape[0], embedded.shape[-1]).index_copy(0, real, embedded)

    def forward(self, bags: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """bags: (B, N, ...) instances; key_padding_mask: (B, N) True = padding. Returns (B,) logits."""
        b, n = bags.shape[:2]
        padding = None if key_padding_mask is None else key_padding_mask.reshape(b * n)
        emb = self.norm_in(self.encode(bags.reshape(b * n, *bags.shape[2:]), padding).view(b, n, -1))
        pooled = self.pooling(emb, key_padding_mask=key_padding_mask).flatten(1)
        return self.head(self.norm_out(F.gelu(pooled))).squeeze(-1)


def mlp_encoder(d_in: int, d_model: int) -> nn.Module:
    """Flatten an instance and project it linearly to d_model (the MNIST-bag encoder of Hu et al.)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, d_model))


def iterate_batches(tensors: tuple[Tensor | None, ...], batch_size: int, shuffle: bool,
                    generator: torch.Generator | None = None) -> Iterable[tuple[Tensor | None, ...]]:
    """Yield aligned mini-batches of the given tensors (None entries stay None)."""
    n = next(t for t in tensors if t is not None).shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield tuple(None if t is None else t[idx] for t in tensors)


def evaluate_bags(model: nn.Module, bags: Tensor, mask: Tensor | None, labels: Tensor,
                  batch_size: int = 256) -> dict[str, float]:
    """Eval-mode loss (BCE with logits) and accuracy (logit > 0) over a bag set."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for xb, mb, yb in iterate_batches((bags, mask, labels), batch_size, shuffle=False):
            logits = model(xb.to(device), None if mb is None else mb.to(device))
            yb = yb.to(device).float()
            total_loss += F.binary_cross_entropy_with_logits(logits, yb, reduction="sum").item()
            correct += ((logits > 0).float() == yb).sum().item()
    n = labels.shape[0]
    return {"loss": total_loss / n, "acc": correct / n}


def train_bag_classifier(model: nn.Module, train: tuple[Tensor, Tensor | None, Tensor],
                         test: tuple[Tensor, Tensor | None, Tensor], epochs: int, lr: float = 1e-4,
                         weight_decay: float = 1e-3, batch_size: int = 256, grad_clip: float | None = None,
                         seed: int = 0, report: Callable[[dict], None] | None = None,
                         device: torch.device | str = "cpu") -> list[dict]:
    """Train with AdamW + cosine schedule on BCE-with-logits; evaluate in eval mode after each epoch.

    ``train``/``test`` are (bags, key_padding_mask or None, labels). ``report`` receives each epoch's
    metrics (train_loss, train_acc measured in eval mode on the training bags, test_loss, test_acc).
    Returns the list of per-epoch metrics.
    """
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(train[0].shape[0] / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, mb, yb in iterate_batches(train, batch_size, shuffle=True, generator=generator):
            logits = model(xb.to(device), None if mb is None else mb.to(device))
            loss = F.binary_cross_entropy_with_logits(logits, yb.to(device).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
        tr, te = evaluate_bags(model, *train), evaluate_bags(model, *test)
        metrics = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "test_loss": te["loss"], "test_acc": te["acc"]}
        history.append(metrics)
        if report is not None:
            report(metrics)
    return history


# --------------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------------
def draw_mean_std(ax: Any, curves: dict[str, np.ndarray], x: np.ndarray | None = None) -> None:
    """Draw, per label, the mean over runs of a (n_runs, n_points) array with a +-1 std band
    (population std). Line styles alternate so that overlapping modes stay visible."""
    for i, (label, values) in enumerate(curves.items()):
        values = np.atleast_2d(np.asarray(values, dtype=float))
        xs = np.arange(1, values.shape[1] + 1) if x is None else np.asarray(x)
        mean, std = values.mean(0), values.std(0)
        ax.plot(xs, mean, label=label, linestyle=("-", "--", "-.", ":")[i % 4])
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
