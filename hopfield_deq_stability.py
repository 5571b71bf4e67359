"""Why the CHN's 'deq' variant breaks at the paper budget: the synchronous map's Jacobian at the fixed
point of a saved training state, and how far each solver gets there.

For a training state that ``hopfield_deq.py`` keeps between epochs (``<results_dir>/<exp_name>/partial/
<label>.pt``; the run deletes it when it finishes, so copy it while the run is going) and ``--n_images``
test images:

* z* = the fixed point, solved with the even/odd map in float64 to a relative residual < 1e-10 (so it
  exists, and even/odd steps reach it);
* J = d f_sync / dz at z* (autograd, D x D with D the state size), its eigenvalues lambda, and those of
  the damped map z <- d z + (1 - d) f_sync(z), d + (1 - d) lambda (d = 0.5 for the CHN). Damped Picard
  steps, the sync variant's forward and the recurrent backprop of sync and deq, contract near z* only
  if every |d + (1 - d) lambda| < 1; for real lambda and d = 0.5 that is lambda > -3;
* the share of 256 test images (float32, as in training) whose solve reaches a residual < 1e-4 within
  the training budget (``forward_iter`` scaled as in hopdeq) for damped Picard, our Anderson, hopdeq's
  Anderson and the even/odd map.

    python3 hopfield_deq_stability.py --state PATH.pt   # writes results/hopfield_deq_stability/<label>_epoch<k>.json
    python3 hopfield_deq_stability.py --report          # the README block from the committed JSONs
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

import hopfield_deq as hd

REPO_DIR = Path(__file__).resolve().parent
OUT_DIR = REPO_DIR / "results" / "hopfield_deq_stability"
PROBE_SOLVERS = (("sync", "anderson"), ("deq", "anderson"), ("deq", "anderson_hopdeq"), ("eo", "anderson"))
PROBE_IMAGES = 256  # test images of the solver-reach probe
REACH_TOL = 1e-4  # the relative residual a solve must reach


def load_state(path: Path) -> dict:
    """A ``hopfield_deq.TrainingState`` file: its trial config, epoch, epoch reports and weights."""
    if not path.is_file():
        raise FileNotFoundError(f"--state {path}: no such file; give a training state that hopfield_deq.py keeps "
                                "between epochs under <results_dir>/<exp_name>/partial/ (copied while its run goes)")
    saved = torch.load(path, weights_only=False)
    missing = {"config", "epoch", "reports", "model"} - set(saved)
    if missing:
        raise ValueError(f"--state {path} is not a hopfield_deq training state (no {sorted(missing)})")
    return saved


def classifier(saved: dict, variant: str, solver: str = "anderson", tol: float | None = REACH_TOL) -> hd.HopfieldClassifier:
    config = saved["config"]
    clf = hd.HopfieldClassifier(config["layers"], config["model"], variant, config["forward_iter"],
                                config["backward_iter"], tol=tol, deq_solver=solver)
    clf.load_state_dict(saved["model"])
    return clf.eval()


def sync_jacobian_spectrum(clf: hd.HopfieldClassifier, x: Tensor, damping: float) -> list[dict]:
    """Per image: residual of z* (even/odd, float64), eigenvalues of d f_sync / dz at z*, of the damped map."""
    net, rows = clf.net, []
    with torch.no_grad():
        states = clf.full_state(x)
    ux = net.preprocess_inputs(x)
    sizes = [s.shape[1] for s in states]
    for b in range(x.shape[0]):
        def f_sync(z: Tensor, b: int = b) -> Tensor:
            return torch.cat(net.sync_map(ux[b:b + 1], torch.split(z[None], sizes, 1)), 1)[0]
        z = torch.cat([s[b] for s in states])
        with torch.no_grad():
            fz = f_sync(z)
            residual = float((fz - z).norm() / fz.norm())
        eig = torch.linalg.eigvals(torch.autograd.functional.jacobian(f_sync, z))
        damped = (damping + (1 - damping) * eig).abs()
        rows.append({"fixed_point_residual": residual, "min_real_eigenvalue": float(eig.real.min()),
                     "max_abs_eigenvalue": float(eig.abs().max()), "damped_spectral_radius": float(damped.max()),
                     "unstable_directions": int((damped > 1).sum())})
    return rows


@torch.no_grad()
def solver_reach(saved: dict, x: Tensor) -> dict[str, float]:
    """% of images whose float32 solve reaches residual < REACH_TOL within the training budget, per solver."""
    reach = {}
    for variant, solver in PROBE_SOLVERS:
        clf = classifier(saved, variant, solver)
        clf(x)
        _, ok = hd.convergence_iterations(clf.deq.last_stats["residuals_per_sample"], REACH_TOL)
        name = f"{variant} ({solver})" if variant.endswith("deq") else variant
        reach[name] = 100.0 * float(ok.float().mean())
    return reach


def analyse(path: Path, n_images: int) -> dict:
    from training import cpu_model, git_commit

    start = time.perf_counter()
    saved = load_state(path)
    config = saved["config"]
    if config["model"] != "chn":
        raise ValueError(f"--state {path}: a {config['model']} run; the damped synchronous map is the CHN's")
    x, _ = hd.load_split("test", PROBE_IMAGES, None, 0)
    damping = hd.variant_settings("chn", "sync", len(config["layers"]))["damping"]
    clf = classifier(saved, "eo", tol=1e-10).double()
    clf.deq.forward_kwargs["iter"] = 500
    spectrum = sync_jacobian_spectrum(clf, x[:n_images].double(), damping)
    return {"state": path.name, "state_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "trial_config": config, "epoch": saved["epoch"],
            "train_loss_by_epoch": [r["train_loss"] for r in saved["reports"]], "damping": damping,
            "spectrum": spectrum, "solver_reach_pct": solver_reach(saved, x), "n_probe_images": PROBE_IMAGES,
            "precision": "float64 (fixed point, Jacobian), float32 (solver reach, as in training)",
            "wall_time_s": time.perf_counter() - start, "git_commit": git_commit(), "cpu": cpu_model()}


def report(out_dir: Path = OUT_DIR) -> str:
    """Markdown for the README: one line per committed analysis."""
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    if not results:
        return "No stability analysis committed yet (`python3 hopfield_deq_stability.py --state PATH.pt`)."
    solvers = list(results[0]["solver_reach_pct"])
    lines = ["| run | after epoch | training loss by epoch | min real eigenvalue of J | spectral radius of the damped map "
             "| unstable directions | " + " | ".join(f"reach 1e-4: {s} %" for s in solvers) + " |",
             "|" + "---|" * (6 + len(solvers))]
    for r in results:
        c, sp = r["trial_config"], r["spectrum"]
        span = lambda key, fmt: f"{min(s[key] for s in sp):{fmt}} to {max(s[key] for s in sp):{fmt}}"  # noqa: E731
        losses = " ".join(f"{v:.3f}" for v in r["train_loss_by_epoch"])
        lines.append(f"| {c['model']} {c['variant']} seed {c['seed']} | {r['epoch']} | {losses} | "
                     f"{span('min_real_eigenvalue', '.2f')} | {span('damped_spectral_radius', '.2f')} | "
                     f"{span('unstable_directions', 'd')} | "
                     + " | ".join(f"{r['solver_reach_pct'][s]:.1f}" for s in solvers) + " |")
    n = ", ".join(sorted({str(len(r["spectrum"])) for r in results}))
    worst = max(s["fixed_point_residual"] for r in results for s in r["spectrum"])
    probe = ", ".join(sorted({str(r["n_probe_images"]) for r in results}))
    return (f"Jacobian at z* of {n} test images per state (z* residual at most {worst:.0e} in float64), solver "
            f"reach over {probe} (`results/hopfield_deq_stability/`):\n\n" + "\n".join(lines))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from training import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=None, help="a CHN training state (hopfield_deq.py partial/*.pt)")
    parser.add_argument("--n_images", type=positive_int, default=4, help="test images whose Jacobian is taken")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=0, help="torch seed (the analysis draws nothing at random)")
    parser.add_argument("--report", action="store_true", help="only rebuild the README block from the JSONs")
    args = parser.parse_args(argv)
    if args.report == (args.state is not None):
        parser.error("give either --state PATH.pt (analyse it) or --report (rebuild the README block)")
    if args.report:
        from training import refuse_flags_besides

        refuse_flags_besides(parser, args, "report", ("out_dir",), "rebuilds the README block from the JSONs")
    return args


def main(argv: Sequence[str] | None = None) -> dict | str:
    import training

    args = parse_args(argv)
    if args.report:
        table = report(args.out_dir)
        training.write_readme_blocks({"hopdeq_stability": table})
        return table
    torch.manual_seed(args.seed)
    result = analyse(args.state, args.n_images)
    c = result["trial_config"]
    path = args.out_dir / f"{c['model']}_{c['variant']}_seed{c['seed']}_epoch{result['epoch']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps({k: result[k] for k in ("epoch", "solver_reach_pct")}), "\n", result["spectrum"])
    print(f"wrote {training.repo_relative(path)}")
    return result


if __name__ == "__main__":
    main()
