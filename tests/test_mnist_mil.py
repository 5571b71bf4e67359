"""Tests of mnist_mil_main.py: model learns, end-to-end Ray runs write their outputs, resume, K-MIL."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import datasets
import mnist_mil_main as mm
import training

TINY = ["--trials", "1", "--epochs", "2", "--n_train", "64", "--n_test", "32", "--d_model", "16",
        "--n_heads", "2", "--batch_size", "32"]


def _dirs(tmp_path) -> list[str]:
    return ["--img_dir", str(tmp_path / "imgs"), "--results_dir", str(tmp_path / "results"),
            "--ray_dir", str(tmp_path / "ray")]


# ------------------------------------------------------------------ pure helpers (no Ray, no training)
def test_parse_mode_and_canonical_names():
    assert mm.parse_mode("softmax") == ("softmax", {})
    assert mm.parse_mode("k_subsets:3") == ("k_subsets", {"k": 3})
    assert mm.parse_mode("entmax_alpha:1.25") == ("entmax_alpha", {"alpha": 1.25})
    assert mm.canonical_mode("k_subsets", k=5, alpha=None) == "k_subsets:5"
    assert mm.canonical_mode("normmax", k=2, alpha=3.0) == "normmax:3"
    assert mm.canonical_mode("gsh", k=2, alpha=None) == "gsh"
    with pytest.raises(ValueError):
        mm.parse_mode("nosuchmap")
    with pytest.raises(ValueError):
        mm.parse_mode("softmax:2")


def test_defaults_quick_and_explicit_flags():
    full = mm.parse_args([])
    assert (full.n_train, full.n_test, full.epochs, full.trials, full.d_model, full.n_heads) == (4000, 1000, 100, 5, 512, 4)
    assert (full.num_pattern, full.scale, full.dropout, full.lr, full.weight_decay, full.batch_size) == (2, 0.1, 0.3, 1e-4, 1e-3, 256)
    assert full.modes == ["softmax", "sparsemax", "entmax", "gsh"]
    quick = mm.parse_args(["--quick", "--epochs", "3"])
    assert quick.trials == mm.BAG_QUICK["trials"] and quick.epochs == 3
    kmil = mm.parse_args(["--k_mil", "3", "--modes", "k_subsets", "--k", "5", "--scale", "auto"])
    assert kmil.modes == ["k_subsets:5"] and kmil.scale is None and kmil.tag == "kmil3"
    assert (kmil.n_train, kmil.n_val, kmil.n_test) == (2000, 500, 500)
    # Santos et al.'s K-MIL protocol (deep-spin/SSHN scripts/MNIST_bags.py): LeNet width 500, weight decay
    # 1e-4, clipping 1.0, 50 epochs; bag sizes max(K, floor(N(14, 5))). Batch and lr stay ours (16, 1e-4).
    assert (kmil.d_model, kmil.weight_decay, kmil.grad_clip, kmil.epochs) == (500, 1e-4, 1.0, 50)
    assert (kmil.batch_size, kmil.lr) == (16, 1e-4)
    assert mm.KMIL_BAGS == dict(mean_bag_size=14.0, std_bag_size=5.0, rounding="floor")
    assert mm.parse_args(["--k_mil", "2", "--d_model", "128"]).d_model == 128
    assert mm.parse_args(["--k_mil", "5"]).modes == list(mm.KMIL_DEFAULT_MODES)
    # the automatic experiment name: task and precision; --quick runs write apart from the committed results
    assert full.exp_name == f"mnist_mil_bag5_{full.precision}" and full.results_dir.endswith("results")
    assert quick.exp_name.endswith("_quick") and quick.results_dir.endswith("results/quick")
    assert mm.parse_args(["--img_dir", "/elsewhere"]).exp_name == full.exp_name
    # Hu et al.'s bag-100 run: 4 query patterns, dropout 0.1 (explicit flags still win)
    big = mm.parse_args(["--bag_size", "100"])
    assert (big.num_pattern, big.dropout) == (4, 0.1)
    assert mm.parse_args(["--bag_size", "100", "--dropout", "0.3"]).dropout == 0.3


def test_indexed_bags_gather_matches_make_mnist_bags():
    images, labels = datasets.load_mnist("test")
    idx, y = datasets.sample_mnist_bag_indices(labels, 20, 7, seed=(3, 1))
    dense, dense_y = datasets.make_mnist_bags(images, labels, 20, 7, seed=(3, 1))
    compact = mm._compact(images, idx)
    bags = mm.IndexedBags(torch.tensor(compact["images"]), torch.as_tensor(compact["indices"]))
    assert bags.shape == (20, 7, 28, 28) and len(compact["images"]) <= 140
    order = torch.tensor([4, 0, 19])
    assert torch.equal(bags[order], torch.tensor(dense)[order])
    assert np.array_equal(y, dense_y)


def test_bag_classifier_encodes_real_instances_only():
    """Padded instances are never encoded and do not change the logits; gradients reach the encoder."""
    torch.manual_seed(0)
    model = mm.build_model({"mode": "sparsemax", "encoder": "lenet", "d_model": 8, "n_heads": 2,
                            "num_pattern": 1, "update_steps": 1, "dropout": 0.0, "scale": 1.0}).eval()
    seen = []
    model.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    bags = torch.rand(2, 4, 28, 28)
    pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
    logits = model(bags, pad)
    assert seen == [5]
    assert torch.allclose(logits[0], model(bags[:1, :2])[0], atol=1e-6)
    assert torch.allclose(logits[1], model(bags[1:, :3])[0], atol=1e-6)
    logits.sum().backward()
    assert model.encoder[1].weight.grad.abs().sum() > 0


def test_lenet_encoder_equals_textbook_lenet_in_float64():
    """``lenet_encoder`` (pool before ReLU, channels-last convs) computes Ilse et al.'s LeNet (conv - ReLU -
    pool, contiguous): same outputs and same gradients for every parameter and the input."""
    torch.manual_seed(0)
    fast = mm.lenet_encoder(12).double()
    textbook = mm.lenet_encoder(12, layout="textbook").double()
    assert [type(m) for m in textbook[1:4]] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    with torch.no_grad():
        for (_, a), (_, b) in zip(fast.named_parameters(), textbook.named_parameters()):
            b.copy_(a)
    assert fast[4].weight.is_contiguous(memory_format=torch.channels_last) and not fast[4].weight.is_contiguous()
    assert textbook[4].weight.is_contiguous() and not textbook[4].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(6, 28, 28, dtype=torch.float64)
    outputs, grads = [], []
    for model in (fast, textbook):
        x = images.clone().requires_grad_()
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-12) and outputs[0].abs().max() > 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("encoder", ["mlp", "lenet"])
def test_images_stored_in_the_autocast_dtype_change_nothing(encoder):
    """bf16 trials keep their images in bf16 (``image_dtype``): the encoder's first op casts them to bf16 under
    autocast anyway, so logits and gradients are bitwise those of float32 images; fp32 trials keep float32."""
    assert mm.image_dtype("fp32") == torch.float32 and mm.image_dtype("bf16") == torch.bfloat16
    torch.manual_seed(0)
    model = mm.build_model({"mode": "sparsemax", "encoder": encoder, "d_model": 8, "n_heads": 2,
                            "num_pattern": 1, "update_steps": 1, "dropout": 0.0, "scale": 1.0})
    bags = torch.rand(3, 4, 28, 28)

    def logits_and_grads(images):
        model.zero_grad()
        with training.autocast("bf16", "cpu"):
            logits = training.full_precision(model(images))
        logits.sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    (expected, expected_grads), (got, got_grads) = logits_and_grads(bags), logits_and_grads(bags.bfloat16())
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, expected_grads))


def test_sparse_minus_softmax_names_the_best_sparse_mode_and_the_std_test():
    def entry(mode, mean, std):
        return {"mode": mode, "test_acc_mean": mean, "test_acc_std": std}

    by_mode = {"softmax": entry("softmax", 0.90, 0.004), "sparsemax": entry("sparsemax", 0.886, 0.006),
               "entmax": entry("entmax", 0.893, 0.004)}
    assert mm.sparse_minus_softmax(by_mode) == "-0.007 (entmax; beyond one std)"
    by_mode["gsh"] = entry("gsh", 0.905, 0.01)
    assert mm.sparse_minus_softmax(by_mode) == "+0.005 (gsh; within one std)"
    assert mm.sparse_minus_softmax({"softmax": by_mode["softmax"]}) == "–"


def test_summary_selects_last_epoch_or_best_validation_epoch():
    args = mm.parse_args(["--modes", "softmax", "k_subsets:2", "--k_mil", "2"])
    rows = []
    for trial, (mode, val, test) in enumerate([("softmax", [0.6, 0.9, 0.8], [0.5, 0.7, 0.95]),
                                                 ("softmax", [0.7, 0.7, 0.6], [0.6, 0.9, 0.9]),
                                                 ("k_subsets:2", [0.5, 0.6, 0.9], [0.5, 0.6, 0.8])]):
        rows += [{"mode": mode, "trial": trial, "epoch": e + 1, "val_acc": v, "test_acc": t}
                 for e, (v, t) in enumerate(zip(val, test))]
    summary = {s["mode"]: s for s in mm.summarize(rows, args)}
    # best validation epochs: trial 0 -> epoch 2 (0.7), trial 1 -> epoch 1 (first of the ties, 0.6)
    assert summary["softmax"]["test_acc_per_trial"] == [0.7, 0.6]
    assert summary["softmax"]["test_acc_mean"] == pytest.approx(0.65)
    assert summary["softmax"]["test_acc_std"] == pytest.approx(0.05)
    assert summary["k_subsets:2"]["santos2024_test_acc"] == 97.7
    assert "97.7" in mm.format_table(list(summary.values()), "t")
    without_val = [{k: v for k, v in r.items() if k != "val_acc"} for r in rows]
    last = {s["mode"]: s for s in mm.summarize(without_val, args)}
    assert last["softmax"]["test_acc_per_trial"] == [0.95, 0.9]
    assert last["softmax"]["test_acc_mean_curve"] == pytest.approx([0.55, 0.8, 0.925])  # seed mean per epoch
    assert "test_acc_mean_curve" not in summary["softmax"]  # selected on validation: no learning-speed curve


def test_learning_speed_is_the_first_epoch_the_mean_curve_reaches_the_threshold():
    assert mm.first_epoch_reaching([0.5, 0.74, 0.75, 0.6, 0.8], 0.75) == 3
    assert mm.first_epoch_reaching([0.5, 0.7], 0.75) is None

    def summary(curves):
        return {"summary": [{"mode": m, "test_acc_mean_curve": c} for m, c in curves.items()]}

    table = mm.learning_speed_table({"20": summary({"softmax": [0.5, 0.6, 0.8], "sparsemax": [0.76, 0.9, 0.9]}),
                                     "5": summary({"softmax": [0.8], "gsh": [0.7]})})
    rows = [line for line in table if line.startswith("| 5 ") or line.startswith("| 20 ")]
    assert rows == ["| 5 | 1 | – | – | >1 |", "| 20 | 3 | 1 | – | – |"]  # bag sizes in numeric order


# ------------------------------------------------------------------ learning (no Ray)
@pytest.mark.parametrize("mode", ["softmax", "sparsemax"])
def test_bag_classifier_learns_separable_bags(mode):
    """Bags of 5 digits, positive iff one is a 0 (the most distinctive digit): well above chance
    after a few epochs. A model that ignores its input, or pools wrongly, stays near 0.5."""
    torch.set_num_threads(1)
    train_images, train_labels = datasets.load_mnist("train")
    test_images, test_labels = datasets.load_mnist("test")
    xb, yb = datasets.make_mnist_bags(train_images, train_labels, 1000, 5, target=0, seed=0)
    xt, yt = datasets.make_mnist_bags(test_images, test_labels, 400, 5, target=0, seed=1)
    training.seed_everything(0)
    model = mm.build_model(dict(mode=mode, encoder="mlp", d_model=64, n_heads=2, num_pattern=1, scale=None,
                                update_steps=1, dropout=0.0))
    history = training.train_bag_classifier(model, (torch.tensor(xb), None, torch.tensor(yb)),
                                            (torch.tensor(xt), None, torch.tensor(yt)),
                                            epochs=6, lr=1e-3, batch_size=32, seed=0)
    assert history[-1]["test_acc"] > 0.9, history
    assert history[-1]["train_loss"] < history[0]["train_loss"]


# ------------------------------------------------------------------ end to end through Ray
@pytest.fixture(scope="module")
def tiny_run(local_ray, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mnist_mil")
    argv = TINY + ["--modes", "softmax", "sparsemax", "--exp_name", "tiny"] + _dirs(tmp_path)
    return argv, tmp_path, mm.main(argv)


def test_end_to_end_writes_figures_and_csv(tiny_run):
    _, tmp_path, out = tiny_run
    for metric in mm.METRICS:
        png = tmp_path / "imgs" / f"{metric}_5.png"
        assert png.exists() and png.stat().st_size > 5000
    frame = pd.read_csv(tmp_path / "imgs" / "metrics_5.csv")
    assert sorted(frame["mode"].unique()) == ["softmax", "sparsemax"]
    assert sorted(frame["epoch"].unique()) == [1, 2] and len(frame) == 4
    assert frame["test_acc"].between(0, 1).all() and (frame["train_loss"] > 0).all()
    summary = json.loads((tmp_path / "results" / "mnist_mil_5_summary.json").read_text())
    assert [s["mode"] for s in summary["summary"]] == ["softmax", "sparsemax"]
    last = frame[frame["epoch"] == 2].set_index("mode")["test_acc"]
    for s in summary["summary"]:
        assert s["test_acc_mean"] == pytest.approx(last[s["mode"]])
    assert (tmp_path / "results" / "mnist_mil_5_summary.csv").exists()


def test_resume_keeps_finished_trials(tiny_run, tmp_path):
    """Trial files checkpoint the sweep: a rerun (here from a copy of the results, as in a fresh clone on
    another machine) trains nothing and returns the stored trials; other settings under the name are refused."""
    import shutil

    argv, run_dir, first = tiny_run
    trial_files = sorted((run_dir / "results" / "tiny" / "trials").glob("*.json"))
    assert [p.name.split("_seed")[0] for p in trial_files] == ["softmax", "sparsemax"]
    record = json.loads(trial_files[0].read_text())
    assert record["config"]["precision"] == first["args"].precision and record["git_commit"]
    assert len(record["history"]) == 2 and record["wall_time_s"] > 0
    clone = tmp_path / "clone"
    shutil.copytree(run_dir / "results", clone / "results")
    moved = [a.replace(str(run_dir), str(clone)) for a in argv]
    second = mm.main(moved)
    assert [t["finished"] for t in second["trials"]] == [t["finished"] for t in first["trials"]]
    assert second["summary"] == first["summary"]
    # one more seed extends the experiment: only the new trials run
    third = mm.main(moved[:1] + ["2"] + moved[2:])
    assert [t["finished"] for t in third["trials"] if t["config"]["seed"] == 0] == [t["finished"] for t in first["trials"]]
    assert len(third["trials"]) == 4
    with pytest.raises(SystemExit, match="other settings"):
        mm.main(moved + ["--lr", "1e-2"])  # same exp_name, different config


def test_tune_space_and_selection_on_validation():
    """--tune: every mode gets the same --num_samples configurations drawn from the documented space, and
    per mode the configuration with the best validation accuracy is reported (its test accuracy at its
    best validation epoch)."""
    args = mm.parse_args(["--tune", "--modes", "softmax", "sparsemax", "--num_samples", "3"])
    configs = mm.trial_configs(args, digest="d")
    assert [c["mode"] for c in configs] == ["softmax"] * 3 + ["sparsemax"] * 3 and {c["seed"] for c in configs} == {0}
    drawn = [{k: c[k] for k in ("lr", "weight_decay", "dropout", "scale", "d_model", "n_heads", "num_pattern")}
             for c in configs]
    assert drawn[:3] == drawn[3:] and len({json.dumps(d) for d in drawn[:3]}) == 3
    rng = np.random.default_rng(0)
    samples = [mm.sample_tune_space(rng) for _ in range(200)]
    assert all(1e-5 <= d["lr"] <= 1e-3 and 1e-4 <= d["weight_decay"] <= 1e-2 for d in samples)
    assert {d["n_heads"] for d in samples} == {1, 2, 4} and {d["dropout"] for d in samples} == {0.0, 0.1, 0.3, 0.5}
    hp = dict(weight_decay=1e-3, dropout=0.0, scale=0.1, d_model=64, n_heads=1, num_pattern=1)
    rows = []
    for trial, (lr, val, test) in enumerate([(1e-4, [0.6, 0.8], [0.6, 0.7]), (3e-4, [0.9, 0.7], [0.85, 0.95]),
                                             (1e-3, [0.5, 0.85], [0.5, 0.99])]):
        rows += [{"mode": "softmax", "trial": trial, "epoch": e + 1, "lr": lr, "val_acc": v, "test_acc": t, **hp}
                 for e, (v, t) in enumerate(zip(val, test))]
    rows += [{**r, "mode": "sparsemax", "trial": r["trial"] + 3} for r in rows]
    summary = mm.summarize(rows, args)
    assert [s["best_config"]["lr"] for s in summary] == [3e-4, 3e-4]
    assert [s["test_acc_mean"] for s in summary] == [0.85, 0.85] and summary[0]["n_trials"] == 1


@pytest.mark.parametrize("stack", ["off", "on"])
def test_kmil_tiny_run(stack, local_ray, tmp_path):
    argv = ["--k_mil", "2", "--modes", "k_subsets:2", "--trials", "2", "--epochs", "2", "--n_train", "32",
            "--n_val", "16", "--n_test", "16", "--d_model", "16", "--n_heads", "2", "--stack_seeds", stack] + _dirs(tmp_path)
    out = mm.main(argv)
    (entry,) = out["summary"]
    assert entry["mode"] == "k_subsets:2" and entry["santos2024_test_acc"] == 97.7 and entry["n_trials"] == 2
    trial_files = list((tmp_path / "results").glob("*/trials/*.json"))
    assert len(trial_files) == (1 if stack == "on" else 2)
    table = mm.kmil_report(tmp_path / "results").splitlines()
    row = next(line for line in table if line.startswith("| k_subsets:2 |"))
    assert table[0] == "| mode | K = 2 | Santos et al. 2024 (K = 2) |" and row.endswith("| 97.7 ± 0.3 |")
    assert f"{100 * entry['test_acc_mean']:.1f} ± {100 * entry['test_acc_std']:.1f}" in row
    precision = training.resolve_precision("auto", use_gpu=False)  # bf16 only where the CPU has AMX/AVX512-BF16
    assert f"| 2 | {precision} | 2 x 2 |" in "\n".join(table)
    assert entry["selection"] == "best validation epoch" and 0 <= entry["test_acc_mean"] <= 1
    frame = pd.read_csv(tmp_path / "imgs" / "metrics_kmil2.csv")
    assert {"val_acc", "test_acc"} <= set(frame.columns) and len(frame) == 2 * 2  # seeds x epochs
    assert (tmp_path / "imgs" / "val_acc_kmil2.png").exists()


def test_kmil_against_published_rows():
    """Only the published (K, k_subsets:k) rows, difference in points, 'within' against the larger std."""
    by_k = {2: {"softmax": {"test_acc_mean": 0.9, "test_acc_std": 0.01},
                "k_subsets:2": {"test_acc_mean": 0.975, "test_acc_std": 0.001}},  # 97.7 ± 0.3: 0.2 <= 0.3
            5: {"k_subsets:3": {"test_acc_mean": 0.93, "test_acc_std": 0.02},  # 92.2 ± 1.2: 0.8 <= 2.0
                "k_subsets:5": {"test_acc_mean": 0.97, "test_acc_std": 0.001}}}  # 95.1 ± 1.5: 1.9 > 1.5
    rows = [line for line in mm.kmil_against_published(by_k) if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 2 | k_subsets:2 | 97.5 ± 0.1 | 97.7 ± 0.3 | -0.2 | yes |",
                    "| 5 | k_subsets:3 | 93.0 ± 2.0 | 92.2 ± 1.2 | +0.8 | yes |",
                    "| 5 | k_subsets:5 | 97.0 ± 0.1 | 95.1 ± 1.5 | +1.9 | no |"]


@pytest.mark.parametrize("mode", ["softmax", "k_subsets:2"])
def test_stacked_seeds_equal_separate_runs(mode):
    """K-MIL seeds trained as one stacked model (grouped LeNet convolutions, batched pooling, per-model
    AdamW + clipping, the same cosine schedule and shuffles) give each seed's separate run (float64)."""
    import batched_mil as bm

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def split(n):
        lengths = torch.randint(3, 8, (n,), generator=g)
        mask = torch.arange(7)[None] >= lengths[:, None]
        bags = torch.rand(n, 7, 28, 28, generator=g, dtype=torch.float64).masked_fill(mask[..., None, None], 0)
        return bags, mask, (torch.rand(n, generator=g) > 0.5).long()

    train, test = split(40), split(20)
    config = dict(mode=mode, encoder="lenet", d_model=16, n_heads=4, num_pattern=1, update_steps=1, dropout=0.0,
                  scale=None)
    seeds = [0, 1, 2]
    models = []
    for seed in seeds:
        training.seed_everything(seed)
        models.append(mm.build_model(config).double())
    shape = bm.Shape(d_in=bm.LENET_FEATURES, emb_dims=16, emb_layers=1, width=16, n_heads=4, emb_proj=False, lenet=True)
    stacked = bm.train_stacked(bm.BatchedBagClassifier.from_models(models, shape), train, {"test": test}, seeds,
                               epochs=2, lr=1e-3, weight_decay=1e-4, batch_size=8, grad_clip=1.0)
    for seed, history in zip(seeds, stacked):
        training.seed_everything(seed)
        alone = training.train_bag_classifier(mm.build_model(config).double(), train, test, epochs=2, lr=1e-3,
                                              weight_decay=1e-4, batch_size=8, grad_clip=1.0, seed=seed,
                                              train_metrics="running")
        for ours, theirs in zip(history, alone):
            for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                assert ours[key] == pytest.approx(theirs[key], abs=1e-12), (seed, key)


@pytest.mark.parametrize("argv,flag", [(["--trials", "0"], "--trials"), (["--epochs", "0"], "--epochs"),
                                       (["--batch_size", "0"], "--batch_size"), (["--bag_size", "0"], "--bag_size"),
                                       (["--k_mil", "0"], "--k_mil"), (["--modes", "k_subsets:abc"], "k_subsets:abc"),
                                       (["--modes", "nosuchmap"], "nosuchmap"), (["--dropout", "1.5"], "--dropout"),
                                       (["--num_samples", "0"], "--num_samples"), (["--n_heads", "3"], "--n_heads"),
                                       (["--cpus_per_trial", "0"], "--cpus_per_trial"),
                                       (["--gpus_per_trial", "1"], "--gpus_per_trial"),
                                       (["--ray_address", "127.0.0.1:1"], "--ray_address"),
                                       (["--precision", "fp16"], "fp16"),
                                       (["--data_dir", "/nonexistent"], "--data_dir")])
def test_bad_arguments_are_refused_before_any_work(argv, flag, capsys, monkeypatch, no_work):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    no_work((mm, "build_bag_data"), (mm, "build_kmil_data"))
    with pytest.raises(SystemExit) as exit_info:
        mm.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code != 0 and flag in captured.err + str(exit_info.value.code)


@pytest.mark.parametrize("argv,message", [
    (["--num_samples", "3"], "--num_samples 3 would be ignored: it applies to --tune"),
    (["--alpha", "1.3", "--modes", "softmax", "entmax_alpha:1.2"], "--alpha 1.3 would be ignored"),
    (["--k", "3", "--modes", "k_subsets:2"], "--k 3 would be ignored: it applies to --modes k_subsets / "
                                             "sequential_k_subsets without ':k'"),
    (["--tune", "--lr", "1e-3"], "--lr 0.001 would be ignored: it applies to runs without --tune"),
    (["--tune", "--trials", "3"], "--trials 3 would be ignored"),
    (["--k_mil", "2", "--bag_size", "10"], "--bag_size 10 would be ignored: it applies to MNIST bags, not --k_mil"),
])
def test_flags_no_mode_reads_are_refused(argv, message, capsys, no_work):
    no_work((mm, "build_bag_data"), (mm, "build_kmil_data"))
    with pytest.raises(SystemExit) as exit_info:
        mm.main(argv)
    assert message in capsys.readouterr().err + str(exit_info.value.code)


def test_tune_refuses_exactly_the_flags_it_draws():
    assert set(mm.sample_tune_space(np.random.default_rng(0))) == set(mm.TUNED)


def test_map_parameters_fill_the_modes_that_read_them():
    args = mm.parse_args(["--modes", "k_subsets", "gsh", "softmax", "--k", "3", "--alpha", "1.2"])
    assert args.modes == ["k_subsets:3", "gsh:1.2", "softmax"] and args.num_samples == mm.DEFAULT_NUM_SAMPLES
    assert mm.parse_args(["--modes", "k_subsets"]).modes == [f"k_subsets:{mm.DEFAULT_K}"]


def test_stacked_batches_keep_k_slots_for_k_subsets():
    """Bags shorter than k: the stacked trainer pads each batch to at least k slots (k_subsets needs k entries;
    the padded ones get weight 0), so SparseMAP with k = 5 trains on bags of 2-3 digits."""
    import batched_mil as bm

    mask = torch.arange(6)[None] >= torch.tensor([2, 3, 2, 3])[:, None]
    bags = torch.rand(4, 6, 28, 28).masked_fill(mask[..., None, None], 0)
    x, pad = bm._bag_batch(bags, mask, torch.tensor([[0, 2], [1, 3]]), min_len=5)
    assert x.shape[2] == 5 and pad.shape == (2, 2, 5) and pad[0, :, 2:].all()
    config = dict(mode="k_subsets:5", encoder="lenet", d_model=8, n_heads=2, num_pattern=1, update_steps=1,
                  dropout=0.0, scale=None)
    models = []
    for seed in (0, 1):
        training.seed_everything(seed)
        models.append(mm.build_model(config))
    shape = bm.Shape(d_in=bm.LENET_FEATURES, emb_dims=8, emb_layers=1, width=8, n_heads=2, emb_proj=False, lenet=True)
    labels = torch.tensor([0, 1, 0, 1])
    histories = bm.train_stacked(bm.BatchedBagClassifier.from_models(models, shape), (bags, mask, labels),
                                 {"test": (bags, mask, labels)}, [0, 1], epochs=1, lr=1e-3, weight_decay=0.0,
                                 batch_size=2, grad_clip=1.0)
    assert all(0 <= h[-1]["test_acc"] <= 1 for h in histories)


def test_committed_experiments_reopen_with_the_current_code():
    """The sweeps committed under results/ resume in a later session: the README's command for each gives the
    settings stored in its experiment.json (a new result-changing flag would make the next session refuse or
    recompute), and the bag-5 data still hashes to the stored digest."""
    import re
    from pathlib import Path

    results = Path(mm.REPO_DIR) / "results"
    experiments = [p for p in sorted(results.glob("mnist_mil_bag*_*/experiment.json"))
                   if re.fullmatch(r"mnist_mil_bag\d+_(fp32|bf16)", p.parent.name)]
    assert experiments, "no committed MNIST-bag experiment"
    for path in experiments:
        bag, precision = re.fullmatch(r"mnist_mil_bag(\d+)_(\w+)", path.parent.name).groups()
        stored = json.loads(path.read_text())
        args = mm.parse_args(["--bag_size", bag, "--precision", precision])
        assert training._canonical(mm.experiment_settings(args, stored["data"])) == stored, path
        if bag == "5":
            assert mm.data_digest(mm.build_bag_data(args)) == stored["data"]


def test_kmil_progress_reads_finished_seeds(tmp_path):
    """The in-progress block: per mode the finished seeds' test accuracy at their best-validation epoch (first on
    ties), from separate and stacked trial files; a K with a summary is left to the K-MIL table."""
    def history(val, test):
        return [{"epoch": e + 1, "val_acc": v, "test_acc": t} for e, (v, t) in enumerate(zip(val, test))]

    config = {"lr": 1e-4, "weight_decay": 1e-4, "dropout": 0.0, "scale": None, "d_model": 500, "n_heads": 4,
              "num_pattern": 1}
    experiment = tmp_path / "mnist_mil_kmil3_fp32"
    (experiment / "trials").mkdir(parents=True)
    (experiment / "experiment.json").write_text(json.dumps({"epochs": 3}))
    separate = {"config": {**config, "mode": "k_subsets:3", "seed": 0},
                "history": history([0.5, 0.9, 0.9], [0.6, 0.80, 0.99])}  # tie at 0.9: epoch 2 counts
    stacked = {"config": {**config, "mode": "k_subsets:3", "seeds": [1, 2]},
               "history": [{"epoch": e + 1, "per_seed": [h1, h2]} for e, (h1, h2) in
                           enumerate(zip(history([0.7, 0.6, 0.8], [0.7, 0.9, 0.9]), history([0.9, 0.1, 0.2], [0.7, 0.1, 0.1])))]}
    softmax = {"config": {**config, "mode": "softmax", "seed": 0}, "history": history([0.1, 0.2, 0.3], [0.1, 0.2, 0.5])}
    for name, trial in [("a", separate), ("b", stacked), ("c", softmax)]:
        (experiment / "trials" / f"{name}.json").write_text(json.dumps(trial))
    lines = mm.kmil_progress(tmp_path).splitlines()
    rows = [line for line in lines if line.startswith("| 3 |")]
    expected = np.array([0.80, 0.9, 0.7])
    assert rows[0] == "| 3 | softmax | 1 of 5 | 3 | 50.0 | 50.0 | 3 | – |"  # default modes' order first; 1 seed: no std
    assert rows[1] == (f"| 3 | k_subsets:3 | 3 of 5 | 3 | {100 * expected.mean():.1f} ± {100 * expected.std():.1f} | "
                       "80.0, 90.0, 70.0 | 2, 3, 1 | 96.5 ± 0.5 |")
    assert mm.kmil_progress(tmp_path, skip=[3]) == "" and mm.kmil_progress(tmp_path / "none") == ""
    assert "No K-MIL table yet" in mm.kmil_report(tmp_path) and rows[1] in mm.kmil_report(tmp_path)
