"""Bit-pattern multiple-instance learning (Ramsauer et al. 2021; used by Hu et al. 2023).

Task: a bag holds ``--bag_size`` random ``--n_bits``-bit instances (uniform over the non-zero codes);
``--n_signals`` fixed random non-zero codes are the signal patterns. A bag is positive iff it holds a
signal pattern: positive bags get ``--signals_per_bag`` signals implanted at random positions, and every
random instance is resampled until it is no signal (otherwise negative bags would carry signals: with 8
of 255 codes as signals and 16 instances that is 1 - (1 - 8/255)^16 = 40 % of the negative bags;
``--label_noise`` keeps that naive sampler to measure its effect). Half of the bags are positive.

Model: ``training.BagClassifier`` with ``training.mlp_encoder`` (bits -> Linear -> LayerNorm ->
HopfieldPooling -> GELU -> LayerNorm -> Linear -> logit), trained by ``training.train_bag_classifier``
(AdamW + cosine schedule, BCE) under ``--precision`` (``training.autocast``; auto = bf16 where the CPU
or GPU has it). Every (mode, seed[, lr, scale, label_noise, normalize_patterns]) is a Ray Tune trial
(``training.run_trials``): each finished trial writes ``<results_dir>/<exp_name>/trials/<mode>_seed<k>_<hash>.json``
(hash of its full config, the data's digest included) and a rerun skips it; an experiment reopened with
other settings is refused. The data are generated from ``--seed`` (no files are read, so there is no
``--data_dir``).

Reported per mode (and setting): final test accuracy mean +- std over seeds, and the fraction of seeds
that diverge (a non-finite loss) or stay at chance (final test accuracy < 0.5 + ``--chance_margin``).

    python3 bit_pattern.py --quick                          # writes results/quick/ (git-ignored)
    python3 bit_pattern.py                                  # 5 modes x 5 seeds
    python3 bit_pattern.py --lr 1e-3 1e-2 --scale auto 1    # instability study: grid over settings
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

import sparsemax
import training

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_MODES = ("softmax", "sparsemax", "entmax", "normmax", "k_subsets")
MODE_PARAMS = {"k_subsets": {"k": 2}, "sequential_k_subsets": {"k": 2}}
SETTING_KEYS = ("lr", "scale", "label_noise", "normalize_patterns")
DEFAULTS = dict(n_train=2048, n_test=512, epochs=30, trials=5)
QUICK = dict(n_train=256, n_test=256, epochs=8, trials=2)  # --quick: explicit flags still win


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def codes_to_bits(codes: np.ndarray, n_bits: int) -> np.ndarray:
    """Integer codes (...,) -> float32 bits (..., n_bits), least significant bit first."""
    return ((codes[..., None] >> np.arange(n_bits)) & 1).astype(np.float32)


def make_signals(n_signals: int, n_bits: int, seed: int) -> np.ndarray:
    """``n_signals`` distinct non-zero random codes of ``n_bits`` bits."""
    if not 0 < n_signals < 2 ** n_bits - 1:
        raise ValueError(f"need 0 < n_signals < 2**n_bits - 1 = {2 ** n_bits - 1}, got {n_signals}")
    if n_bits > 62:
        raise ValueError("n_bits must be <= 62")
    rng = np.random.default_rng((seed, 7))
    chosen: list[int] = []
    while len(chosen) < n_signals:
        code = int(rng.integers(1, 2 ** n_bits))
        if code not in chosen:
            chosen.append(code)
    return np.asarray(chosen, dtype=np.int64)


def make_bit_pattern_bags(n_bags: int, bag_size: int, n_bits: int, signals: np.ndarray,
                          signals_per_bag: int = 1, frac_positive: float = 0.5, seed: int = 0,
                          label_noise: bool = False) -> tuple[Tensor, Tensor]:
    """Bags (n_bags, bag_size, n_bits) float32 in {0, 1} and labels (n_bags,) int64 (1 = holds a signal).

    Random instances are uniform over the non-zero codes, resampled while they equal a signal (unless
    ``label_noise``); the first round(frac_positive * n_bags) bags (then shuffled) get ``signals_per_bag``
    signals at distinct random positions.
    """
    if not 1 <= signals_per_bag <= bag_size:
        raise ValueError("signals_per_bag must be in [1, bag_size]")
    rng = np.random.default_rng((seed, 11))
    codes = rng.integers(1, 2 ** n_bits, size=(n_bags, bag_size))
    if not label_noise:
        bad = np.isin(codes, signals)
        while bad.any():
            codes[bad] = rng.integers(1, 2 ** n_bits, size=int(bad.sum()))
            bad = np.isin(codes, signals)
    n_pos = int(round(frac_positive * n_bags))
    labels = np.zeros(n_bags, dtype=np.int64)
    labels[:n_pos] = 1
    for b in range(n_pos):
        positions = rng.choice(bag_size, size=signals_per_bag, replace=False)
        codes[b, positions] = rng.choice(signals, size=signals_per_bag)
    order = rng.permutation(n_bags)
    return torch.from_numpy(codes_to_bits(codes[order], n_bits)), torch.from_numpy(labels[order])


def signal_rate(bags: Tensor, signals: np.ndarray, n_bits: int) -> Tensor:
    """Per bag: does it hold a signal pattern? (the true label; differs from the given one under label noise)."""
    weights = torch.tensor([1 << i for i in range(n_bits)], dtype=torch.int64)
    codes = (bags.round().long() * weights).sum(-1)
    return torch.isin(codes, torch.from_numpy(signals)).any(-1)


def build_data(args: argparse.Namespace) -> dict:
    """Train/test splits for both label-noise settings (same signals, disjoint data seeds; both are built
    whichever ``--label_noise`` runs, so the data's digest names one data set per task flags)."""
    signals = make_signals(args.n_signals, args.n_bits, args.seed)
    data = {"signals": signals.tolist()}
    for noise in (0, 1):
        splits = {}
        for split, n, stream in (("train", args.n_train, 0), ("test", args.n_test, 1)):
            bags, labels = make_bit_pattern_bags(n, args.bag_size, args.n_bits, signals, args.signals_per_bag,
                                                 0.5, seed=args.seed * 10 + stream, label_noise=bool(noise))
            splits[split] = {"bags": bags, "labels": labels}
            holds = signal_rate(bags, signals, args.n_bits)
            wrong = (holds.long() != labels).float().mean().item()
            print(f"label_noise={noise} {split}: {n} bags, {labels.float().mean().item():.2f} positive, "
                  f"{100 * wrong:.1f} % labels disagree with 'holds a signal'")
        data[f"noise{int(noise)}"] = splits
    return data


# --------------------------------------------------------------------------------------------------
# Trial
# --------------------------------------------------------------------------------------------------
def build_model(config: dict) -> training.BagClassifier:
    mode = config["mode"]
    encoder = training.mlp_encoder(config["n_bits"], config["d_model"])
    return training.BagClassifier(encoder, config["d_model"], num_pattern=config["num_pattern"],
                                  n_heads=config["n_heads"], mix=True, update_steps=config["update_steps"],
                                  dropout=config["dropout"], mode=mode, scale=config["scale"],
                                  normalize_patterns=bool(config["normalize_patterns"]),
                                  **MODE_PARAMS.get(mode, {}))


def run_trial(config: dict, data: dict, report: Callable[[dict], None] | None = None) -> list[dict]:
    """Train one classifier (no Ray needed); returns per-epoch metrics (also passed to ``report``).
    Adds ``grad_norm_max``: the largest gradient norm at an optimizer step of the epoch (after clipping)."""
    device = training.trial_device(config)
    training.seed_everything(config["seed"])
    splits = data[f"noise{int(config['label_noise'])}"]
    model = build_model(config)
    grad_norms: list[float] = []

    def record_grad_norm(_optimizer, _args, _kwargs) -> None:
        norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        if norms:
            grad_norms.append(torch.stack(norms).norm().item())

    def report_epoch(metrics: dict) -> None:
        metrics["grad_norm_max"] = max(grad_norms) if grad_norms else float("nan")
        grad_norms.clear()
        metrics.update(signal_recall(model, splits["test"], data["signals"], config["n_bits"], config["precision"]))
        if report is not None:
            report(metrics)

    hook = register_optimizer_step_pre_hook(record_grad_norm)
    try:
        return training.train_bag_classifier(
            model, (splits["train"]["bags"], None, splits["train"]["labels"]),
            (splits["test"]["bags"], None, splits["test"]["labels"]), epochs=config["epochs"], lr=config["lr"],
            weight_decay=config["weight_decay"], batch_size=config["batch_size"], grad_clip=config["grad_clip"],
            seed=config["seed"], report=report_epoch, device=device, precision=config["precision"])
    finally:
        hook.remove()


def signal_recall(model: torch.nn.Module, split: dict, signals: Sequence[int], n_bits: int,
                  precision: str = "fp32") -> dict:
    """Recall of the positive test bags grouped by the signal they hold (first one): a classifier stuck
    below 100 % typically misses whole signals. Returns min_signal_recall and signals_missed (recall < 0.5)."""
    bags, labels = split["bags"], split["labels"]
    weights = torch.tensor([1 << i for i in range(n_bits)], dtype=torch.int64)
    codes = (bags.round().long() * weights).sum(-1)
    positive = labels == 1
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), training.autocast(precision, device):
        predicted = torch.cat([model(bags[i:i + 256].to(device)).float().cpu() > 0 for i in range(0, len(bags), 256)])
    recalls = []
    for code in signals:
        holds = positive & (codes == code).any(-1)
        if holds.any():
            recalls.append(predicted[holds].float().mean().item())
    if not recalls:
        return {"min_signal_recall": float("nan"), "signals_missed": 0}
    return {"min_signal_recall": min(recalls), "signals_missed": sum(r < 0.5 for r in recalls)}


def train_trial(config: dict, data: dict) -> None:
    """Ray Tune trainable: one report per epoch."""
    from ray import tune

    run_trial(config, data, tune.report)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _scale(text: str) -> float | None:
    """--scale value: 'auto'/'none' (1/sqrt(head dim)) or a finite beta > 0."""
    if text.lower() in ("auto", "none"):
        return None
    return training.positive_float(text)


_scale.__name__ = "'auto' or a finite number > 0"


def build_parser() -> argparse.ArgumentParser:
    pint, nnint, pfloat = training.positive_int, training.nonnegative_int, training.positive_float
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_argument_group("task (the bags are generated from --seed: no data files, no --data_dir)")
    task.add_argument("--bag_size", type=pint, default=16, help="instances per bag")
    task.add_argument("--n_bits", type=pint, default=8, help="bits per instance (1..62)")
    task.add_argument("--n_signals", type=pint, default=8,
                      help="number of distinct signal patterns (< 2**n_bits - 1)")
    task.add_argument("--signals_per_bag", type=pint, default=1, help="signals implanted in a positive bag (<= bag_size)")
    task.add_argument("--n_train", type=pint, default=None, help=f"training bags (default {DEFAULTS['n_train']})")
    task.add_argument("--n_test", type=pint, default=None, help=f"test bags (default {DEFAULTS['n_test']})")
    task.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=sparsemax.MODES)
    task.add_argument("--seed", type=int, default=0, help="data seed; trial i trains with seed + i")
    task.add_argument("--trials", type=pint, default=None,
                      help=f"seeds per mode and setting (default {DEFAULTS['trials']})")
    parser.add_argument("--report", action="store_true",
                        help="only write the README block bit_pattern_table from results/bit_pattern_summary.json")
    task.add_argument("--quick", action="store_true",
                      help=f"smoke setting {QUICK} written to results/quick/ (git-ignored); explicit flags win")
    task.add_argument("--chance_margin", type=training.probability, default=0.1,
                      help="a seed 'stays at chance' if its final test accuracy < 0.5 + this (in [0, 0.5))")
    hyper = parser.add_argument_group("model and training (several values of lr/scale/label_noise/"
                                      "normalize_patterns: a grid, one summary row per setting)")
    hyper.add_argument("--epochs", type=pint, default=None, help=f"default {DEFAULTS['epochs']}")
    hyper.add_argument("--d_model", type=pint, default=32)
    hyper.add_argument("--n_heads", type=pint, default=4, help="must divide d_model")
    hyper.add_argument("--num_pattern", type=pint, default=2)
    hyper.add_argument("--update_steps", type=nnint, default=1)
    hyper.add_argument("--dropout", type=training.probability, default=0.0)
    hyper.add_argument("--lr", type=pfloat, nargs="+", default=[1e-2])
    hyper.add_argument("--scale", type=_scale, nargs="+", default=[None],
                       help="beta; 'auto' = 1/sqrt(d_model/n_heads)")
    hyper.add_argument("--label_noise", type=int, nargs="+", default=[0], choices=(0, 1),
                       help="1: naive sampler whose negative bags may hold signals")
    hyper.add_argument("--normalize_patterns", type=int, nargs="+", default=[0], choices=(0, 1),
                       help="1: LayerNorm on state and stored patterns inside the Hopfield layer")
    hyper.add_argument("--weight_decay", type=training.nonnegative_float, default=1e-4)
    hyper.add_argument("--batch_size", type=pint, default=64)
    hyper.add_argument("--grad_clip", type=pfloat, default=None)
    training.add_precision_arg(hyper)
    out = parser.add_argument_group("outputs")
    out.add_argument("--img_dir", default=None,
                     help="curves and per-epoch CSV (default imgs/; --quick: results/quick/imgs/)")
    out.add_argument("--results_dir", default=None,
                     help="summary CSV/JSON, config, and the experiment's trial files under <exp_name>/trials/ "
                          "(default results/; --quick: results/quick/)")
    training.add_ray_args(parser, default_exp_name="auto")
    return parser


# Flags that do not change any trial's result (so they may differ on resume).
_NON_RESULT_FLAGS = {"ray_address", "cpus_per_trial", "gpus_per_trial", "gpus_id", "num_cpus", "exp_name",
                     "ray_dir", "img_dir", "results_dir", "quick", "chance_margin"}
# Flags that only choose which trials run (each trial file has its own identity): an experiment may grow.
_TRIAL_SELECTION_FLAGS = {"modes", "trials"} | set(SETTING_KEYS)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2, naming the flags) combinations that a single flag's type cannot check."""
    if args.n_bits > 62:
        parser.error(f"--n_bits {args.n_bits}: allowed 1..62 (codes are int64)")
    if args.n_signals >= 2 ** args.n_bits - 1:
        parser.error(f"--n_signals {args.n_signals}: allowed 1..{2 ** args.n_bits - 2} with --n_bits {args.n_bits} "
                     "(some non-zero code must remain a non-signal)")
    if args.signals_per_bag > args.bag_size:
        parser.error(f"--signals_per_bag {args.signals_per_bag}: allowed 1..{args.bag_size} (--bag_size)")
    if args.d_model % args.n_heads:
        parser.error(f"--n_heads {args.n_heads} does not divide --d_model {args.d_model}")
    if args.chance_margin >= 0.5:
        parser.error(f"--chance_margin {args.chance_margin:g}: allowed [0, 0.5)")
    if len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes {' '.join(args.modes)}: a mode is repeated")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag before any work (data, Ray); --quick fills only the flags not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        training.refuse_flags_besides(parser, args, "report", (),
                                      "rebuilds the README table from the committed summary")
        return args
    for name, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(parser, args)
    training.check_ray_args(args)
    try:
        args.precision = training.resolve_precision(args.precision, use_gpu=args.gpus_per_trial > 0)
    except ValueError as error:
        parser.error(str(error))
    smoke = REPO_DIR / "results" / "quick"
    args.results_dir = args.results_dir or str(smoke if args.quick else REPO_DIR / "results")
    args.img_dir = args.img_dir or str(smoke / "imgs" if args.quick else REPO_DIR / "imgs")
    if args.exp_name == "auto":  # named after the shared settings, so other settings get their own experiment
        fingerprint = json.dumps(shared_flags(args), sort_keys=True, default=str)
        args.exp_name = f"bit_pattern_{hashlib.sha1(fingerprint.encode()).hexdigest()[:8]}"
    return args


def shared_flags(args: argparse.Namespace) -> dict:
    """The flags every trial of an experiment shares (those that determine results, minus trial selection)."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in _NON_RESULT_FLAGS and k not in _TRIAL_SELECTION_FLAGS}


def experiment_settings(args: argparse.Namespace, digest: str) -> dict:
    """What every trial of the experiment shares, the data's digest included: reopening it with other
    values is refused."""
    return {**shared_flags(args), "data": digest}


def trial_configs(args: argparse.Namespace, digest: str) -> list[dict]:
    """mode x seed x the grid of SETTING_KEYS; each config holds everything its result depends on (the
    data's digest and the precision included): its trial file's identity."""
    fixed = {name: getattr(args, name) for name in ("epochs", "d_model", "n_heads", "num_pattern", "update_steps",
                                                     "dropout", "weight_decay", "batch_size", "grad_clip", "n_bits",
                                                     "precision")}
    grid = {"mode": list(args.modes), "seed": [args.seed + i for i in range(args.trials)],
            **{key: list(getattr(args, key)) for key in SETTING_KEYS}}
    return training.expand_grid({**fixed, "data": digest, **{k: {"grid_search": v} for k, v in grid.items()}})


def trial_label(config: dict) -> str:
    """Readable part of a trial file's name."""
    return f"{config['mode']}_seed{config['seed']}"


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
def setting_name(config: dict) -> str:
    scale = "auto" if config["scale"] is None else f"{config['scale']:g}"
    return (f"lr={config['lr']:g} scale={scale} label_noise={int(config['label_noise'])} "
            f"layernorm={int(config['normalize_patterns'])}")


def epoch_records(trials: list[dict]) -> list[dict]:
    rows = []
    for trial in sorted(trials, key=lambda t: json.dumps(t["config"], sort_keys=True, default=str)):
        config = trial["config"]
        for h in sorted(trial["history"], key=lambda r: r["epoch"]):
            row = {"mode": config["mode"], "seed": config["seed"], "setting": setting_name(config)}
            row.update({k: config[k] for k in SETTING_KEYS})
            row.update({k: h[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc",
                                          "grad_norm_max", "min_signal_recall", "signals_missed") if k in h})
            rows.append(row)
    return rows


def classify_seed(history: list[dict], chance_margin: float) -> str:
    """'diverged' (a non-finite loss), 'chance' (final test acc < 0.5 + margin) or 'learned'."""
    if any(not math.isfinite(h["train_loss"]) or not math.isfinite(h["test_loss"]) for h in history):
        return "diverged"
    final = max(history, key=lambda h: h["epoch"])
    return "chance" if final["test_acc"] < 0.5 + chance_margin else "learned"


def summarize(records: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per (mode, setting): final test accuracy mean +- std over seeds, diverged / at-chance fractions."""
    import pandas as pd

    frame = pd.DataFrame(records)
    summary = []
    for (setting, mode), group in frame.groupby(["setting", "mode"], sort=True):
        finals, outcomes, missed = [], [], []
        for _, seed_rows in group.groupby("seed"):
            history = seed_rows.to_dict("records")
            last = max(history, key=lambda h: h["epoch"])
            finals.append(last["test_acc"])
            value = last.get("signals_missed")
            missed.append(int(value) if value is not None and np.isfinite(value) else -1)  # -1: not measured
            outcomes.append(classify_seed(history, args.chance_margin))
        accs = np.array(finals, dtype=float)
        summary.append({"mode": mode, "setting": setting, **{k: group.iloc[0][k] for k in SETTING_KEYS},
                        "test_acc_mean": float(np.nanmean(accs)), "test_acc_std": float(np.nanstd(accs)),
                        "n_seeds": len(accs), "frac_diverged": outcomes.count("diverged") / len(outcomes),
                        "frac_chance": outcomes.count("chance") / len(outcomes),
                        "frac_below_95": float(np.mean(accs < 0.95)),
                        "frac_missing_a_signal": float(np.mean(np.array(missed) > 0)),
                        "signals_missed_per_seed": missed,
                        "test_acc_per_seed": accs.tolist(), "outcome_per_seed": outcomes})
    order = {m: i for i, m in enumerate(args.modes)}
    return sorted(summary, key=lambda s: (s["setting"], order.get(s["mode"], 99)))


def format_table(summary: list[dict]) -> str:
    lines = ["| setting | mode | test acc (%) | diverged | at chance | < 95 % | missing a signal | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['setting']} | {s['mode']} | {100 * s['test_acc_mean']:.1f} +- "
                     f"{100 * s['test_acc_std']:.1f} | {s['frac_diverged']:.2f} | {s['frac_chance']:.2f} | "
                     f"{s['frac_below_95']:.2f} | {s['frac_missing_a_signal']:.2f} | {s['n_seeds']} |")
    return "\n".join(lines)


def mode_label(mode: str) -> str:
    """A mode with its fixed map parameters: "k_subsets (k=2)"."""
    params = ", ".join(f"{k}={v}" for k, v in MODE_PARAMS.get(mode, {}).items())
    return f"{mode} ({params})" if params else mode


def readme_report(path: Path = REPO_DIR / "results" / "bit_pattern_summary.json") -> str:
    """The README block ``bit_pattern_table``: per setting of the committed run, each mode's final-epoch test
    accuracy and its seeds that miss a whole signal or end below 95 %."""
    payload = json.loads(path.read_text())
    c = payload["config"]
    lines = [f"Committed run (`{training.repo_relative(path)}`): bag {c['bag_size']}, {c['n_bits']} bits, "
             f"{c['n_signals']} signals, {c['n_train']}/{c['n_test']} bags, {c['epochs']} epochs, {c['trials']} seeds; "
             "final-epoch test accuracy %, mean ± std over seeds (seeds that miss a whole signal / end below 95 %):"]
    for setting in dict.fromkeys(s["setting"] for s in payload["summary"]):
        cells = [f"{mode_label(s['mode'])} {100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f} "
                 f"({round(s['frac_missing_a_signal'] * s['n_seeds'])} / {round(s['frac_below_95'] * s['n_seeds'])} "
                 f"of {s['n_seeds']})" for s in payload["summary"] if s["setting"] == setting]
        lines += ["", f"{setting}: " + ", ".join(cells) + "."]
    return "\n".join(lines)


def write_report() -> str:
    """``--report``: rewrite the README block ``bit_pattern_table`` from the committed summary; prints it."""
    table = readme_report()
    training.write_readme_blocks({"bit_pattern_table": table})
    return table


def plot_curves(records: list[dict], args: argparse.Namespace) -> list[Path]:
    """``{img_dir}/bit_pattern_{test_acc,train_loss}.png``: mean +- std over seeds per mode (one panel per setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(records)
    settings = sorted(frame.setting.unique())
    paths = []
    for metric, ylabel in (("test_acc", "test accuracy"), ("train_loss", "train BCE loss")):
        fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False, sharey=True)
        for ax, setting in zip(axes[0], settings):
            curves, epochs = {}, None
            for mode in args.modes:
                d = frame[(frame.setting == setting) & (frame["mode"] == mode)]
                if not d.empty:
                    pivot = d.pivot(index="seed", columns="epoch", values=metric)
                    curves[mode], epochs = pivot.to_numpy(), pivot.columns.to_numpy()
            training.draw_mean_std(ax, curves, epochs)
            ax.set_title(setting, fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel(f"{ylabel} (mean +- std over seeds)")
        axes[0, -1].legend(fontsize=8)
        fig.suptitle(f"bit-pattern MIL ({args.precision}): bag size {args.bag_size}, {args.n_bits} bits, {args.n_signals} signals",
                     fontsize=10)
        fig.tight_layout()
        path = Path(args.img_dir) / f"bit_pattern_{metric}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(records: list[dict], summary: list[dict], args: argparse.Namespace, data: dict,
                  trials: list[dict], config: dict) -> dict[str, Path]:
    """Per-epoch CSV and curves under --img_dir; summary CSV and JSON (config, precision, data digest,
    provenance: trial wall times and git commits) under --results_dir."""
    import pandas as pd

    img_dir, results_dir = Path(args.img_dir), Path(args.results_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics_csv": img_dir / "bit_pattern_metrics.csv",
             "summary_csv": results_dir / "bit_pattern_summary.csv",
             "summary_json": results_dir / "bit_pattern_summary.json"}
    pd.DataFrame(records).to_csv(files["metrics_csv"], index=False)
    flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in s.items()} for s in summary]
    pd.DataFrame(flat).to_csv(files["summary_csv"], index=False)
    payload = {"config": config, "exp_name": args.exp_name, "precision": args.precision,
               "data": trials[0]["config"]["data"] if trials else None, "signals": data["signals"],
               "summary": summary, "provenance": training.trial_provenance(trials)}
    files["summary_json"].write_text(json.dumps(payload, indent=2, default=str))
    for i, path in enumerate(plot_curves(records, args)):
        files[f"plot_{i}"] = path
    return files


def main(argv: Sequence[str] | None = None) -> dict:
    """Check the flags, open the experiment (refused if it was started with other settings), run the trials
    without a trial file, write curves/CSV/JSON, print the table and where it wrote them."""
    args = parse_args(argv)
    if args.report:
        write_report()
        return {}
    training.seed_everything(args.seed)
    data = build_data(args)
    digest = training.array_digest(data)
    trial_dir = training.open_experiment(Path(args.results_dir) / args.exp_name, experiment_settings(args, digest))
    config = training.log_config(args, Path(args.results_dir) / "bit_pattern_config.json")
    print(f"precision {args.precision}; data {digest[:12]}; experiment {training.repo_relative(trial_dir)}")
    trials = training.run_trials(train_trial, trial_configs(args, digest), args, trial_dir, label=trial_label,
                                 params={"data": data})
    records = epoch_records(trials)
    summary = summarize(records, args)
    files = write_outputs(records, summary, args, data, trials, config)
    print(f"\nbit-pattern MIL, final-epoch test accuracy ({args.precision}, mean +- std over seeds)\n"
          + format_table(summary))
    print("\nwrote:\n" + "\n".join(f"  {training.repo_relative(path)}" for path in files.values()))
    return {"summary": summary, "files": files, "trials": trials, "args": args, "config": config}


if __name__ == "__main__":
    main(sys.argv[1:])
