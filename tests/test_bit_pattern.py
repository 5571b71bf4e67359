"""bit_pattern.py: the data generator is exact, a tiny Ray run writes results, an easy setting learns."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import bit_pattern as bp
import training


def codes_of(bags: torch.Tensor, n_bits: int) -> np.ndarray:
    return (bags.round().long() * (2 ** torch.arange(n_bits))).sum(-1).numpy()


def test_labels_are_exact_without_label_noise():
    signals = bp.make_signals(8, 8, seed=3)
    assert len(set(signals.tolist())) == 8 and (signals > 0).all() and (signals < 256).all()
    bags, labels = bp.make_bit_pattern_bags(400, 16, 8, signals, signals_per_bag=2, seed=1)
    assert bags.shape == (400, 16, 8) and set(bags.unique().tolist()) == {0.0, 1.0}
    assert labels.sum().item() == 200
    codes = codes_of(bags, 8)
    n_signal = np.isin(codes, signals).sum(-1)
    assert (n_signal[labels.numpy() == 0] == 0).all()  # negatives hold no signal
    assert (n_signal[labels.numpy() == 1] == 2).all()  # positives exactly signals_per_bag
    assert (codes > 0).all()  # no all-zero instance
    assert torch.equal(bp.signal_rate(bags, signals, 8), labels.bool())


def test_label_noise_rate_matches_the_naive_sampler():
    """Naive sampler: P(negative bag holds a signal) = 1 - (1 - S / (2^b - 1))^n."""
    signals = bp.make_signals(8, 8, seed=0)
    bags, labels = bp.make_bit_pattern_bags(4000, 16, 8, signals, seed=2, label_noise=True)
    holds = bp.signal_rate(bags, signals, 8)
    rate = holds[labels == 0].float().mean().item()
    expected = 1 - (1 - 8 / 255) ** 16
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / 2000)
    assert holds[labels == 1].all()


def test_classify_seed():
    ok = [{"epoch": 1, "train_loss": 0.6, "test_loss": 0.6, "test_acc": 0.55},
          {"epoch": 2, "train_loss": 0.1, "test_loss": 0.1, "test_acc": 0.97}]
    assert bp.classify_seed(ok, 0.1) == "learned"
    assert bp.classify_seed(ok[:1], 0.1) == "chance"
    assert bp.classify_seed(ok + [{"epoch": 3, "train_loss": float("nan"), "test_loss": 0.1, "test_acc": 0.5}],
                            0.1) == "diverged"


def test_easy_setting_learns_without_ray():
    """One signal pattern, small bags: a linear key score can single it out, so the model must learn it."""
    args = bp.parse_args(["--bag_size", "4", "--n_bits", "6", "--n_signals", "1", "--n_train", "512",
                          "--n_test", "256"])
    data = bp.build_data(args)
    config = dict(mode="sparsemax", seed=0, lr=1e-2, scale=None, label_noise=0, normalize_patterns=0, epochs=12,
                  d_model=16, n_heads=2, num_pattern=1, update_steps=1, dropout=0.0, weight_decay=1e-4,
                  batch_size=64, grad_clip=None, n_bits=6, cpus_per_trial=1, precision="fp32")
    history = bp.run_trial(config, data)
    assert len(history) == 12
    assert history[-1]["test_acc"] >= 0.9
    assert history[0]["grad_norm_max"] > 0
    assert history[-1]["signals_missed"] == 0 and history[-1]["min_signal_recall"] >= 0.9


BAD_ARGS = [  # (argv, a word the message must hold)
    (["--trials", "0"], "--trials"), (["--epochs", "0"], "--epochs"), (["--batch_size", "0"], "--batch_size"),
    (["--bag_size", "0"], "--bag_size"), (["--n_train=-5"], "--n_train"), (["--n_test", "0"], "--n_test"),
    (["--n_bits", "63"], "--n_bits"), (["--n_signals", "255"], "--n_signals"),
    (["--signals_per_bag", "17"], "--signals_per_bag"), (["--n_heads", "3"], "--n_heads"), (["--lr", "0"], "--lr"),
    (["--scale=-1"], "--scale"), (["--dropout", "1"], "--dropout"), (["--weight_decay=-1"], "--weight_decay"),
    (["--modes", "softmax", "softmax"], "--modes"), (["--modes", "nope"], "--modes"),
    (["--chance_margin", "0.6"], "--chance_margin"), (["--precision", "fp16"], "--precision"),
    (["--cpus_per_trial", "0"], "--cpus_per_trial"), (["--cpus_per_trial", "999"], "--cpus_per_trial"),
    (["--ray_address", "127.0.0.1:1"], "--ray_address"),
]
if torch.cuda.device_count() == 0:
    BAD_ARGS.append((["--gpus_per_trial", "1", "--precision", "fp32"], "--gpus_per_trial"))


@pytest.mark.parametrize("argv, flag", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_refused_before_any_work(argv, flag, capsys, no_work, tmp_path):
    no_work((bp, "build_data"))
    with pytest.raises(SystemExit) as exit_info:
        bp.main(argv + ["--results_dir", str(tmp_path)])
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert exit_info.value.code != 0 and flag in message, message
    assert not list(tmp_path.iterdir())  # nothing written


def test_quick_fills_only_flags_not_given_and_writes_apart():
    args = bp.parse_args(["--quick", "--epochs", "30", "--n_test", "100"])
    assert (args.epochs, args.n_test, args.n_train, args.trials) == (30, 100, bp.QUICK["n_train"], bp.QUICK["trials"])
    assert training.repo_relative(args.results_dir) == "results/quick"
    assert training.repo_relative(args.img_dir) == "results/quick/imgs"
    plain = bp.parse_args(["--precision", "fp32"])
    assert (plain.epochs, plain.n_train) == (bp.DEFAULTS["epochs"], bp.DEFAULTS["n_train"])
    config = training.log_config(plain)
    assert (config["results_dir"], config["img_dir"], config["ray_dir"]) == ("results", "imgs", "results/ray")
    assert "no --data_dir" in bp.build_parser().format_help()


def test_precision_reaches_training_and_trial_identity(monkeypatch):
    """--precision goes into every trial config (so into its file's identity) and into training."""
    args = bp.parse_args(["--quick", "--precision", "bf16", "--modes", "softmax"])
    configs = bp.trial_configs(args, "digest")
    assert {c["precision"] for c in configs} == {"bf16"} and {c["data"] for c in configs} == {"digest"}
    fp32 = bp.trial_configs(bp.parse_args(["--quick", "--precision", "fp32", "--modes", "softmax"]), "digest")
    assert {training.trial_key(c) for c in configs}.isdisjoint(training.trial_key(c) for c in fp32)
    seen = {}
    monkeypatch.setattr(training, "train_bag_classifier", lambda *a, **kw: seen.update(kw) or [])
    data = bp.build_data(bp.parse_args(["--bag_size", "4", "--n_bits", "6", "--n_train", "8", "--n_test", "8"]))
    bp.run_trial({**configs[0], "n_bits": 6, "cpus_per_trial": 1}, data)
    assert seen["precision"] == "bf16"


def test_data_digest_names_the_data():
    args = bp.parse_args(["--n_train", "32", "--n_test", "32"])
    digest = training.array_digest(bp.build_data(args))
    assert digest == training.array_digest(bp.build_data(args))
    assert digest != training.array_digest(bp.build_data(bp.parse_args(["--n_train", "32", "--n_test", "32",
                                                                         "--seed", "1"])))


def test_ray_run_trial_files_resume_and_refusal(local_ray, tmp_path, monkeypatch):
    common = ["--quick", "--trials", "1", "--epochs", "2", "--n_train", "64", "--n_test", "64", "--precision", "fp32",
              "--img_dir", str(tmp_path / "imgs"), "--results_dir", str(tmp_path / "results"),
              "--ray_dir", str(tmp_path / "ray"), "--exp_name", "test_bit_pattern"]
    result = bp.main(common + ["--modes", "softmax", "sparsemax"])
    trial_files = sorted((tmp_path / "results" / "test_bit_pattern" / "trials").glob("*.json"))
    assert [p.name.split("_seed")[0] for p in trial_files] == ["softmax", "sparsemax"]
    record = json.loads(trial_files[0].read_text())
    assert record["config"]["precision"] == "fp32" and len(record["config"]["data"]) == 40
    assert len(record["history"]) == 2 and record["wall_time_s"] > 0 and record["git_commit"]
    payload = json.loads((tmp_path / "results" / "bit_pattern_summary.json").read_text())
    summary = payload["summary"]
    assert payload["precision"] == "fp32" and payload["provenance"]["n_trials"] == 2
    assert [s["mode"] for s in summary] == ["softmax", "sparsemax"]
    for s in summary:
        assert 0 <= s["test_acc_mean"] <= 1 and s["n_seeds"] == 1
        assert s["frac_diverged"] + s["frac_chance"] <= 1
        assert len(s["signals_missed_per_seed"]) == 1 and 0 <= s["signals_missed_per_seed"][0] <= 8
    metrics = pd.read_csv(tmp_path / "imgs" / "bit_pattern_metrics.csv")
    assert len(metrics) == 2 * 2  # 2 modes x 2 epochs
    for name in ("bit_pattern_test_acc.png", "bit_pattern_train_loss.png"):
        assert (tmp_path / "imgs" / name).stat().st_size > 5000
    assert len(result["trials"]) == 2
    # rerun with a subset of the modes: served from the trial files (nothing runs), only that mode returned
    monkeypatch.setattr(training, "_fit", lambda *a, **k: pytest.fail("a finished trial was run again"))
    again = bp.main(common + ["--modes", "sparsemax"])
    assert [s["mode"] for s in again["summary"]] == ["sparsemax"]
    assert again["summary"][0]["test_acc_per_seed"] == summary[1]["test_acc_per_seed"]
    # other settings under the same name: refused before any work, naming the setting
    for changed, setting in ((["--epochs", "3"], "epochs"), (["--precision", "bf16"], "precision"),
                             (["--n_train", "65"], "n_train")):
        with pytest.raises(SystemExit, match=setting):
            bp.main(common + ["--modes", "sparsemax"] + changed)
