"""bit_pattern.py: the data generator is exact, a tiny Ray run writes results, an easy setting learns."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import torch

import bit_pattern as bp


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
                  batch_size=64, grad_clip=None, n_bits=6, cpus_per_trial=1)
    history = bp.run_trial(config, data)
    assert len(history) == 12
    assert history[-1]["test_acc"] >= 0.9
    assert history[0]["grad_norm_max"] > 0
    assert history[-1]["signals_missed"] == 0 and history[-1]["min_signal_recall"] >= 0.9


def test_tiny_ray_run_writes_results(local_ray, tmp_path):
    result = bp.main(["--quick", "--modes", "softmax", "sparsemax", "--trials", "1", "--epochs", "2",
                      "--n_train", "64", "--n_test", "64", "--img_dir", str(tmp_path / "imgs"),
                      "--results_dir", str(tmp_path / "results"), "--ray_dir", str(tmp_path / "ray"),
                      "--exp_name", "test_bit_pattern"])
    summary = json.loads((tmp_path / "results" / "bit_pattern_summary.json").read_text())["summary"]
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
