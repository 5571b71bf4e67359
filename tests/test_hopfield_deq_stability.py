"""hopfield_deq_stability: the Jacobian spectrum at the fixed point of a saved state, and its report."""
from __future__ import annotations

import json

import pytest
import torch

import hopfield_deq as hd
import hopfield_deq_stability as stab

LAYERS = [784, 6, 10]


def saved_state(tmp_path, weight_scale: float) -> tuple[torch.nn.Module, object]:
    """A CHN deq training state file as hopfield_deq.TrainingState writes it, weights scaled up."""
    torch.manual_seed(0)
    clf = hd.HopfieldClassifier(LAYERS, "chn", "deq")
    with torch.no_grad():
        for p in list(clf.net.W) + [clf.net.U]:
            p.mul_(weight_scale)
    config = {"layers": LAYERS, "model": "chn", "variant": "deq", "seed": 3, "forward_iter": 40, "backward_iter": 8}
    optimizer = torch.optim.SGD(clf.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=1)
    path = tmp_path / "chn_deq_seed3_x.pt"
    hd.TrainingState(config, clf, optimizer, scheduler, torch.Generator()).save(
        path, 2, [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}], 1.0)
    return clf, path


def test_spectrum_is_that_of_the_finite_difference_jacobian_at_the_fixed_point(tmp_path):
    _, path = saved_state(tmp_path, 3.0)
    clf = stab.classifier(stab.load_state(path), "eo", tol=1e-12).double()
    clf.deq.forward_kwargs["iter"] = 500
    x, _ = hd.load_split("test", 2, None, 0)
    rows = stab.sync_jacobian_spectrum(clf, x.double(), 0.5)
    with torch.no_grad():
        states = clf.full_state(x.double())
        ux = clf.net.preprocess_inputs(x.double())
    for b, row in enumerate(rows):
        assert row["fixed_point_residual"] < 1e-10
        z = torch.cat([s[b] for s in states])

        def f(v):
            return torch.cat(clf.net.sync_map(ux[b:b + 1], torch.split(v[None], [6, 10], 1)), 1)[0]
        eps = 1e-6
        with torch.no_grad():
            jac = torch.stack([(f(z + eps * e) - f(z - eps * e)) / (2 * eps) for e in torch.eye(16, dtype=z.dtype)], 1)
            eig = torch.linalg.eigvals(jac)
        assert row["min_real_eigenvalue"] == pytest.approx(float(eig.real.min()), abs=1e-6)
        damped = (0.5 + 0.5 * eig).abs()
        assert row["damped_spectral_radius"] == pytest.approx(float(damped.max()), abs=1e-6)
        assert row["unstable_directions"] == int((damped > 1).sum())


def test_analysis_file_and_report(tmp_path):
    _, path = saved_state(tmp_path, 1.0)
    result = stab.main(["--state", str(path), "--n_images", "2", "--out_dir", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "chn_deq_seed3_epoch2.json").read_text())
    assert written["state_sha256"] == result["state_sha256"] and written["train_loss_by_epoch"] == [0.5, 0.25]
    assert set(written["solver_reach_pct"]) == {"sync", "deq (anderson)", "deq (anderson_hopdeq)", "eo"}
    assert all(0 <= v <= 100 for v in written["solver_reach_pct"].values()) and written["git_commit"]
    table = stab.report(tmp_path / "out")
    assert "| chn deq seed 3 | 2 | 0.500 0.250 |" in table
    assert "No stability analysis" in stab.report(tmp_path / "none")


@pytest.mark.parametrize("argv", [[], ["--report", "--state", "x.pt"], ["--state", "x.pt", "--n_images", "0"]])
def test_bad_arguments_refused(argv):
    with pytest.raises(SystemExit):
        stab.parse_args(argv)


def test_missing_or_foreign_state_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="partial"):
        stab.load_state(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a hopfield_deq training state"):
        stab.load_state(tmp_path / "other.pt")
