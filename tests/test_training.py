"""Tests of the shared engine (training.py): precision, trial files that checkpoint a sweep, a real Ray
cluster reached only through --ray_address."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mnist_mil_main as mm
import training

REPO_DIR = Path(__file__).resolve().parents[1]


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    training.seed_everything(seed)
    return mm.build_model(dict(mode="sparsemax", encoder="mlp", d_model=16, n_heads=2, num_pattern=2, scale=0.5,
                               update_steps=1, dropout=0.0))


def _tiny_bags(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 5, 28, 28, generator=g), None, (torch.rand(n, generator=g) > 0.5).long()


# ------------------------------------------------------------------ precision
def test_cpu_model_names_the_cpu_and_its_bf16(monkeypatch):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.cpu_model().endswith(" (native bf16: yes)")
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    name = training.cpu_model().removesuffix(" (native bf16: no)")
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    if names:
        assert name == names[0]
    assert name and training.trial_cpus([{"cpu": "b"}, {}, {"cpu": "a"}, {"cpu": "b"}]) == ["a", "b", "unrecorded"]


def test_resolve_precision_rules(monkeypatch):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.resolve_precision("auto", use_gpu=False) == "bf16"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert training.resolve_precision("auto", use_gpu=False) == "fp32"
    assert training.resolve_precision("bf16", use_gpu=False) == "bf16"
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        training.resolve_precision("fp16", use_gpu=False)
    with pytest.raises(ValueError, match="choose from"):
        training.resolve_precision("fp8", use_gpu=False)


def test_bf16_runs_in_bf16_inside_the_model():
    """Under --precision bf16 the encoder and the pooling compute in bfloat16; the weights and the optimizer
    state stay float32; fp32 leaves everything in float32."""
    for precision, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = _tiny_model()
        seen = {}
        for name in ("encoder", "pooling"):
            getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.dtype}) and None)
        training.train_bag_classifier(model, _tiny_bags(), _tiny_bags(32, 1), epochs=1, batch_size=32,
                                      precision=precision)
        assert seen == {"encoder": expected, "pooling": expected}, precision
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp32_training_equals_a_plain_adamw_loop():
    """precision fp32 + eval train metrics is the plain loop (AdamW, cosine, BCE, same batches). In float64,
    to a tolerance: MKL's float32 GEMMs may round differently with memory alignment."""
    train, test = tuple(t.double() if t is not None and t.is_floating_point() else t for t in _tiny_bags()), \
        tuple(t.double() if t is not None and t.is_floating_point() else t for t in _tiny_bags(32, 1))
    history = training.train_bag_classifier(_tiny_model().double(), train, test, epochs=2, lr=1e-3, batch_size=16,
                                            seed=3, precision="fp32", train_metrics="eval")
    model = _tiny_model().double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * 4)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        model.train()
        for idx in torch.randperm(64, generator=generator).split(16):
            loss = F.binary_cross_entropy_with_logits(model(train[0][idx]), train[2][idx].double())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    assert history[-1]["test_loss"] == pytest.approx(training.evaluate_bags(model, *test)["loss"], abs=1e-12)
    assert history[-1]["train_acc"] == training.evaluate_bags(model, *train)["acc"]


def test_bf16_training_tracks_fp32():
    """The same run in bf16 ends close to fp32 (a wrong cast, e.g. weights rounded to bf16, drifts far)."""
    train, test = _tiny_bags(256), _tiny_bags(64, 1)
    runs = {p: training.train_bag_classifier(_tiny_model(), train, test, epochs=3, lr=1e-3, batch_size=32, precision=p)
            for p in ("fp32", "bf16")}
    assert abs(runs["bf16"][-1]["train_loss"] - runs["fp32"][-1]["train_loss"]) < 0.02


def test_running_train_metrics_are_the_batches_mean():
    """train_metrics='running': the mean of the epoch's mini-batch losses (no extra pass)."""
    losses = []
    model = _tiny_model()
    model.register_forward_hook(lambda m, i, o: (losses.append(o.detach()) if m.training else None) and None)
    train = _tiny_bags()
    history = training.train_bag_classifier(model, train, _tiny_bags(32, 1), epochs=1, batch_size=16, seed=0,
                                            train_metrics="running")
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    labels = torch.cat([train[2][idx] for idx in order.split(16)]).float()
    expected = F.binary_cross_entropy_with_logits(torch.cat(losses), labels).item()
    assert history[0]["train_loss"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ experiment identity and trial files
def test_open_experiment_refuses_other_settings(tmp_path):
    trials = training.open_experiment(tmp_path / "exp", {"lr": 1e-3, "data": "abc"})
    assert trials == tmp_path / "exp" / "trials"
    assert training.open_experiment(tmp_path / "exp", {"data": "abc", "lr": 1e-3}) == trials
    with pytest.raises(SystemExit, match=r"'lr': \(0.001, 0.01\)"):
        training.open_experiment(tmp_path / "exp", {"lr": 1e-2, "data": "abc"})


def test_trial_files_identify_their_config(tmp_path):
    config = {"mode": "softmax", "seed": 1, "lr": 1e-3}
    path = training.trial_file(tmp_path, config, label=lambda c: c["mode"])
    assert path.name.startswith("softmax_") and training.load_trial(path, config) is None
    training._write_atomically(path, json.dumps({"config": config, "history": []}))
    assert training.load_trial(path, config)["config"] == config
    assert training.load_trial(path, {**config, "lr": 1e-2}) is None  # a changed config is not that trial
    assert not list(tmp_path.glob(".*tmp"))


def _finished_trial(finished: str, wall_time_s: float) -> dict:
    return {"finished": f"2026-12-02T{finished}+0000", "wall_time_s": wall_time_s, "config": {"precision": "bf16"},
            "git_commit": "a"}


def test_sweep_wall_clock_is_the_time_some_trial_ran():
    # two overlapping trials 00:50-01:00 and 00:58-01:05, one inside the first (00:52-00:55), then a
    # resumed session's trial 03:00-03:10: busy 15 + 10 min; the gap 01:05-03:00 does not count
    trials = [_finished_trial("01:00:00", 600.0), _finished_trial("01:05:00", 420.0),
              _finished_trial("00:55:00", 180.0), _finished_trial("03:10:00", 600.0)]
    assert training.sweep_wall_clock_s(trials) == 1500.0
    assert training.sweep_wall_clock_s(trials[:2]) == 900.0  # 00:50 -> 01:05
    assert training.trial_provenance(trials)["wall_clock_s"] == 1500.0
    assert training.sweep_wall_clock_s([_finished_trial("01:00:00", 60.0)] * 2) == 60.0  # identical intervals once
    assert training.sweep_wall_clock_s([{"wall_time_s": 1.0}]) is None


@pytest.mark.parametrize("script,argv,message", [
    ("real_world_mil", ["--report", "--epochs", "3"], "--report rebuilds the table and figures from result files and "
                                                      "takes only --quick, --results_dir, --img_dir (got --epochs)"),
    ("real_world_mil", ["--refit", "--report"], "(got --refit)"),
    ("mnist_mil_main", ["--report", "--bag_size", "20"], "takes only --results_dir (got --bag_size)"),
    ("mnist_mil_main", ["--report", "--results_dir", "/nonexistent/results"], "no such directory"),
    ("bit_pattern", ["--report", "--n_bits", "4"], "takes no other flag (got --n_bits)"),
    ("hopfield_deq", ["--report", "--runs", "2"], "takes no other flag (got --runs)"),
    ("hopfield_deq_stability", ["--report", "--n_images", "2"], "takes only --out_dir (got --n_images)"),
    ("Plotting", ["--report", "--seed", "3"], "takes only --out_dir, --quick (got --seed)"),
])
def test_report_refuses_the_flags_it_would_ignore(script, argv, message, capsys):
    """Every script's --report only rebuilds tables from result files: a training flag beside it is an error."""
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert exit_info.value.code != 0 and message in capsys.readouterr().err


def test_mnist_report_of_other_results_leaves_the_readme_alone(tmp_path, monkeypatch):
    """Tables from a smoke run's results_dir go into that directory only, never into the README's blocks."""
    monkeypatch.setattr(training, "write_readme_block", lambda *a, **k: pytest.fail("README block rewritten"))
    mm.main(["--report", "--results_dir", str(tmp_path)])
    assert (tmp_path / "mnist_mil_table.md").exists() and (tmp_path / "mnist_kmil_table.md").exists()


def test_expand_grid_covers_every_combination():
    grid = training.expand_grid({"a": {"grid_search": [1, 2]}, "b": {"grid_search": ["x", "y", "z"]}, "c": 0})
    assert len(grid) == 6 and all(g["c"] == 0 for g in grid)
    assert {(g["a"], g["b"]) for g in grid} == {(a, b) for a in (1, 2) for b in "xyz"}


def test_repo_relative_paths():
    assert training.repo_relative(REPO_DIR / "results" / "x") == "results/x"
    assert training.repo_relative("/somewhere/else") == "/somewhere/else"


# ------------------------------------------------------------------ a real Ray cluster
TINY = ["--trials", "1", "--epochs", "1", "--n_train", "32", "--n_test", "16", "--d_model", "8", "--n_heads", "2",
        "--batch_size", "16", "--modes", "softmax"]


def _kill_processes_mentioning(marker: str) -> None:
    """Stop the processes of the Ray cluster this test started (their command lines name its temp dir)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    os.kill(int(proc.name), sig)
                    alive.append(proc.name)
            except (OSError, ProcessLookupError):
                continue
        if not alive:
            return
        time.sleep(2)


@pytest.fixture
def ray_cluster():
    """A Ray head on this machine (1 CPU, its own temp dir, no dashboard); stopped by its own PIDs."""
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), "start", "--head", "--port=0", "--num-cpus=1", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        yield (Path(temp_dir) / "ray_current_cluster").read_text().strip(), env
    finally:
        _kill_processes_mentioning(temp_dir)


def test_sweep_through_ray_address_and_local_runs_stay_private(ray_cluster, tmp_path):
    """--ray_address runs the sweep on the given cluster; without it a run beside that cluster starts its
    own private Ray instead of joining it."""
    address, env = ray_cluster
    outputs = {}
    for name, extra in (("cluster", ["--ray_address", address]), ("local", [])):
        dirs = ["--results_dir", str(tmp_path / name), "--img_dir", str(tmp_path / name / "imgs"),
                "--ray_dir", str(tmp_path / "ray")]
        run = subprocess.run([sys.executable, "mnist_mil_main.py", *TINY, *dirs, *extra], cwd=REPO_DIR, env=env,
                             capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[name] = run.stdout + run.stderr
        summary = json.loads((tmp_path / name / "mnist_mil_5_summary.json").read_text())
        assert summary["summary"][0]["n_trials"] == 1
    assert "Connecting to existing Ray cluster" in outputs["cluster"]
    assert "Started a local Ray instance" not in outputs["cluster"]
    assert "Started a local Ray instance" in outputs["local"]
    assert "Connecting to existing Ray cluster" not in outputs["local"]


def test_git_commit_marks_code_changes_but_not_what_a_run_rewrites(tmp_path, monkeypatch):
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *cmd], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()
    (tmp_path / "results").mkdir()
    files = {"model.py": "x = 1\n", "README.md": "# r\n", "results/a.json": "{}\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(training, "REPO_DIR", tmp_path)
    (tmp_path / "README.md").write_text("# rewritten block\n")
    (tmp_path / "results/a.json").write_text('{"auc": 1}\n')
    (tmp_path / "new_untracked.py").write_text("y = 2\n")
    assert training.git_commit() == head
    (tmp_path / "model.py").write_text("x = 2\n")
    assert training.git_commit() == head + "+dirty"
