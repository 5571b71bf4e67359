"""Hopfield dynamics as deep equilibrium models (Goemaere, Deleu & Demeester, ECAI 2024 ML-DE workshop,
"Accelerating Hopfield Network Dynamics: Beyond Synchronous Updates and Forward Euler"; code: hopdeq).

Layered networks with states s_1..s_L (s_0 = x, the clamped image), activation
rho(v) = sigmoid(4 (v - 0.5)) and ONE symmetric weight matrix: layer l couples only to l-1 and l+1,
through W_l and W_l^T (block tri-diagonal, zero diagonal blocks). The drive of layer l is

    C_l(s) = b_l + rho(s_{l-1}) W_{l-1} + rho(s_{l+1}) W_l^T     (W_0 = U acts on rho(x); no W_L term)

* CHN (continuous Hopfield network, as in Scellier & Bengio's EqProp):
      E(s) = sum_l ||s_l||^2 / 2 - sum_l b_l.rho(s_l) - sum_l rho(s_{l-1}) W_{l-1} rho(s_l)
      ds/dt = -dE/ds = rho'(s) * C(s) - s          fixed point  s = rho'(s) * C(s)
* HAM (hierarchical associative memory, Krotov 2021), Lagrangian L(v) = sum softplus(4(v - .5)) / 4:
      E(s) = sum_l [s_l.rho(s_l) - L(s_l)] - (same bias / interaction terms)
      dE/ds = rho'(s) * (s - C(s))                  fixed point  s = C(s)

Variants (each yields the same fixed point):
* 'sync':  forward Euler with all layers updated at once, z <- d z + (1 - d) f(z), d = 0.5 for the CHN
           and 0 for the HAM (hopdeq's choices); f = the synchronous map above.
* 'deq':   Anderson acceleration on the same (damped) synchronous map.
* 'eo':    even/odd splitting: odd layers (1, 3, ...) depend only on even layers (0 = x, 2, 4, ...), so
           given the even layers they are updated exactly in one block step, then the even layers given
           the new odd ones (block Gauss-Seidel). For the HAM a block step is s_l = C_l; for the CHN it
           solves s_l = rho'(s_l) * C_l elementwise, i.e. s_l = h(C_l) with h the inverse of
           v -> v / rho'(v) (strictly increasing, so h is well defined: the CHN behaves as a HAM with
           activation h). The iterated map acts on the even layers (which hold the output layer L;
           L must be even, as for the paper's 3/5/7-layer nets); no damping.
* 'eo_deq': Anderson acceleration on the even/odd map.

hopdeq approximates the CHN block step with 10 damped Picard steps carried in the state; here it is
solved to float precision by a safeguarded Newton method in log space (``chn_block_solve``).

Training (as hopdeq): output = state of the last layer, loss 0.5 * ||s_L - onehot(y)||^2 averaged over
the batch, Madam (p_scale 1024, g_bound 3) with a linear lr decay to lr / 10, recurrent backprop through
``backward_iter`` map applications from the fixed point. Iteration budgets are hopdeq's: forward_iter
and backward_iter times int((n_layers // 2) / (1 - damping)).

Run ``python3 hopfield_deq.py --help``; ``--quick`` is a seconds-long smoke run.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq import DEQ
from madam import Madam

VARIANTS = ("sync", "deq", "eo", "eo_deq")
MODELS = ("chn", "ham")
PAPER_ARCHITECTURES = {3: ([784, 1990, 10], 0.01), 5: ([784, 1280, 510, 200, 10], 0.005),
                       7: ([784, 1024, 512, 256, 128, 70, 10], 0.005)}
# Mean iterations (forward-Euler time) to a relative residual < 1e-4 reported in hopdeq's notebook
PAPER_T2C = {"sync": 39.1, "deq": 20.6, "eo": 16.8, "eo_deq": 16.2}


# --------------------------------------------------------------------------------------------------
# Activation and the exact CHN block step
# --------------------------------------------------------------------------------------------------
def rho(v: Tensor) -> Tensor:
    """rho(v) = sigmoid(4 (v - 0.5))."""
    return torch.sigmoid(4.0 * (v - 0.5))


def rho_prime(v: Tensor) -> Tensor:
    """rho'(v) = 4 rho(v) (1 - rho(v))."""
    r = rho(v)
    return 4.0 * r * (1.0 - r)


_TABLE_RANGE, _TABLE_SIZE = 32.0, 6401
_SIG_M2 = 1.0 / (1.0 + math.exp(2.0))  # rho(0) = sigmoid(-2)
_RHO_PRIME_0 = 4.0 * _SIG_M2 * (1.0 - _SIG_M2)
_RHO_SECOND_0 = 4.0 * _RHO_PRIME_0 * (1.0 - 2.0 * _SIG_M2)
_TABLES: dict = {}


def _initial_guess_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """h(c) on a uniform grid of c in [-32, 32] (step 0.01), solved once in float64 and cached."""
    key = (dtype, device)
    if key not in _TABLES:
        grid = torch.linspace(-_TABLE_RANGE, _TABLE_RANGE, _TABLE_SIZE, dtype=torch.float64)
        t0 = 0.42 * grid.abs()
        _TABLES[key] = _solve_chn_block(grid, 1e-13, 100, t0).to(dtype=dtype, device=device)
    return _TABLES[key]


def _table_guess(c: Tensor) -> Tensor:
    """|h(c)| by linear interpolation in the cached table (|c| > 32: the table's end value); for
    |c| < 0.05 the series h(c) = rho'(0) c + rho'(0) rho''(0) c^2 + O(c^3) (the grid index of a tiny c
    is not accurate enough in float32)."""
    table = _initial_guess_table(c.dtype, c.device)
    pos = (c.clamp(-_TABLE_RANGE, _TABLE_RANGE) + _TABLE_RANGE) * ((_TABLE_SIZE - 1) / (2 * _TABLE_RANGE))
    idx = pos.floor().clamp(max=_TABLE_SIZE - 2)
    frac = pos - idx
    idx = idx.long()
    guess = torch.lerp(table[idx], table[idx + 1], frac).abs()
    series = (_RHO_PRIME_0 * c + _RHO_PRIME_0 * _RHO_SECOND_0 * c * c).abs()
    return torch.where(c.abs() < 0.05, series, guess)


def _solve_chn_block(c: Tensor, tol: float, max_iter: int, t0: Tensor | None = None) -> Tensor:
    """Root of s = rho'(s) c per entry. s has the sign of c and |s| <= |c| (rho' <= 1); with t = |s|,
    u(t) = log(t / (|c| rho'(sign(c) t))) is strictly increasing in t, and Newton steps on u are kept
    inside a shrinking bracket [lo, hi] (falling back to bisection). Started from an interpolated
    table of h (``t0`` overrides), Newton typically needs 1-2 steps."""
    tiny = torch.finfo(c.dtype).tiny
    sign = torch.sign(c)
    abs_c = c.abs().clamp_min(tiny)
    lo, hi = torch.zeros_like(c), abs_c.clone()
    t = _table_guess(c) if t0 is None else t0
    t = torch.minimum(t.clamp_min(tiny), abs_c)
    for _ in range(max_iter):
        a = 4.0 * (sign * t - 0.5)
        r_pos, r_neg = torch.sigmoid(a), torch.sigmoid(-a)  # rho and 1 - rho, both accurate
        u = torch.log(t / (4.0 * abs_c * r_pos * r_neg).clamp_min(tiny)).masked_fill(c == 0, 0.0)
        if bool((u.abs() < tol).all()):
            break
        lo = torch.where(u < 0, t, lo)
        hi = torch.where(u >= 0, t, hi)
        t_newton = t - u / (1.0 / t + 4.0 * sign * (r_pos - r_neg))  # u'(t) = 1/t + 4 sign (2 rho - 1)
        cand = torch.minimum(torch.maximum(t_newton, lo), hi)
        stuck = (cand != t_newton) & ((cand == t) | (cand <= 0))
        t = torch.where(stuck, 0.5 * (lo + hi), cand)
    return torch.where(c == 0, torch.zeros_like(c), sign * t)


class _CHNBlock(torch.autograd.Function):
    """s = h(c) solving s = rho'(s) c; ds/dc = rho'(s) / (1 - c rho''(s)) (implicit function theorem)."""

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:
        tol = 1e-12 if c.dtype == torch.float64 else 2e-6
        s = _solve_chn_block(c, tol, 60)
        ctx.save_for_backward(c, s)
        return s

    @staticmethod
    def backward(ctx, grad_s: Tensor) -> Tensor:
        c, s = ctx.saved_tensors
        r = rho(s)
        d1 = 4.0 * r * (1.0 - r)
        d2 = 4.0 * d1 * (1.0 - 2.0 * r)
        return grad_s * d1 / (1.0 - c * d2)


def chn_block_solve(c: Tensor) -> Tensor:
    """Exact CHN block update: the unique s with s = rho'(s) * c (elementwise), differentiable."""
    return _CHNBlock.apply(c)


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
class HopfieldNet(nn.Module):
    """Layered CHN / HAM with a block tri-diagonal symmetric weight matrix (see module docstring).

    layers = [d_0 (input), d_1, ..., d_L (output)]; states are tuples (s_1, ..., s_L) of (B, d_l).
    Parameters: U (d_0, d_1), W[l] (d_{l+1}, d_{l+2}) coupling state index l and l+1, b[l] (d_{l+1}),
    initialised as in hopdeq (Xavier-uniform weights, N(0, 0.01^2) biases).
    """

    def __init__(self, layers: Sequence[int], model: str = "chn") -> None:
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if len(layers) < 2:
            raise ValueError("need at least an input and an output layer")
        self.layers, self.model = list(layers), model
        dims = self.layers[1:]
        self.U = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.layers[0], dims[0])))
        self.W = nn.ParameterList([nn.Parameter(nn.init.xavier_uniform_(torch.empty(a, b)))
                                   for a, b in zip(dims[:-1], dims[1:])])
        self.b = nn.ParameterList([nn.Parameter(0.01 * torch.randn(d)) for d in dims])

    @property
    def n_states(self) -> int:
        return len(self.layers) - 1

    @property
    def odd(self) -> list[int]:
        """State indices of the odd layers 1, 3, ... (index i holds layer i + 1)."""
        return list(range(0, self.n_states, 2))

    @property
    def even(self) -> list[int]:
        """State indices of the even layers 2, 4, ..., L."""
        return list(range(1, self.n_states, 2))

    def preprocess_inputs(self, x: Tensor) -> Tensor:
        """rho(x) U for images x (B, ...) flattened to (B, d_0): the only term involving the input."""
        return rho(x.reshape(x.shape[0], -1)) @ self.U

    def zero_state(self, batch_size: int, like: Tensor) -> tuple[Tensor, ...]:
        return tuple(like.new_zeros(batch_size, d) for d in self.layers[1:])

    def drive(self, ux: Tensor, states: Sequence[Tensor | None], i: int) -> Tensor:
        """C_i = b_i + (rho(x) U if i == 0 else rho(s_{i-1}) W_{i-1}) + rho(s_{i+1}) W_i^T."""
        c = self.b[i] + (ux if i == 0 else rho(states[i - 1]) @ self.W[i - 1])
        if i + 1 < self.n_states:
            c = c + rho(states[i + 1]) @ self.W[i].T
        return c

    def block_update(self, c: Tensor) -> Tensor:
        """Exact minimiser of the energy over one layer given its drive: C (HAM) or h(C) (CHN)."""
        return c if self.model == "ham" else chn_block_solve(c)

    def sync_map(self, ux: Tensor, states: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Synchronous forward-Euler step with unit step: s <- rho'(s) C(s) (CHN) or C(s) (HAM)."""
        drives = [self.drive(ux, states, i) for i in range(self.n_states)]
        if self.model == "ham":
            return tuple(drives)
        return tuple(rho_prime(s) * c for s, c in zip(states, drives))

    def odd_from_even(self, ux: Tensor, even_states: Sequence[Tensor]) -> list[Tensor | None]:
        """Full state list with the odd layers set to their exact block update given the even ones."""
        states: list[Tensor | None] = [None] * self.n_states
        for i, s in zip(self.even, even_states):
            states[i] = s
        for i in self.odd:
            states[i] = self.block_update(self.drive(ux, states, i))
        return states

    def eo_map(self, ux: Tensor, even_states: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Even/odd step: odd layers given the even ones, then the even layers given the new odd ones."""
        states = self.odd_from_even(ux, even_states)
        return tuple(self.block_update(self.drive(ux, states, i)) for i in self.even)

    def energy(self, ux: Tensor, states: Sequence[Tensor]) -> Tensor:
        """E(s) per sample (B,) for the model (CHN or HAM); see the module docstring."""
        r = [rho(s) for s in states]
        if self.model == "chn":
            e = sum(0.5 * (s ** 2).sum(-1) for s in states)
        else:
            e = sum((s * ri).sum(-1) - (F.softplus(4.0 * (s - 0.5)) / 4.0).sum(-1) for s, ri in zip(states, r))
        e = e - sum((ri * bi).sum(-1) for ri, bi in zip(r, self.b)) - (ux * r[0]).sum(-1)
        e = e - sum(((r[i] @ self.W[i]) * r[i + 1]).sum(-1) for i in range(self.n_states - 1))
        return e

    def dense_weight(self) -> Tensor:
        """The full symmetric (sum d_l) x (sum d_l) interaction matrix (for tests and inspection)."""
        dims = self.layers[1:]
        offsets = np.cumsum([0] + dims)
        full = self.U.new_zeros(offsets[-1], offsets[-1])
        for i, w in enumerate(self.W):
            full[offsets[i]:offsets[i + 1], offsets[i + 1]:offsets[i + 2]] = w
            full[offsets[i + 1]:offsets[i + 2], offsets[i]:offsets[i + 1]] = w.T
        return full


class _SyncFunction(nn.Module):
    """hopdeq protocol adapter for the synchronous map."""

    def __init__(self, net: HopfieldNet) -> None:
        super().__init__()
        self.net = net

    def preprocess_inputs(self, x: Tensor) -> Tensor:
        return self.net.preprocess_inputs(x)

    def forward(self, ux: Tensor, states: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return self.net.sync_map(ux, states)


class _EvenOddFunction(_SyncFunction):
    """hopdeq protocol adapter for the even/odd map (state = even layers only)."""

    def forward(self, ux: Tensor, states: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return self.net.eo_map(ux, states)


def variant_settings(model: str, variant: str, n_layers: int, forward_iter: int = 40,
                     backward_iter: int = 8) -> dict:
    """Solver, damping and (hopdeq-scaled) iteration budgets of a variant."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    even_odd = variant.startswith("eo")
    damping = 0.5 if (model == "chn" and not even_odd) else 0.0
    scale = int((n_layers // 2) / (1.0 - damping))
    return {"solver": "anderson" if variant.endswith("deq") else "picard", "even_odd": even_odd,
            "damping": damping, "forward_iter": forward_iter * scale, "backward_iter": backward_iter * scale}


class HopfieldClassifier(nn.Module):
    """MNIST classifier: image -> equilibrium of a HopfieldNet (one variant) -> output-layer state."""

    def __init__(self, layers: Sequence[int], model: str = "chn", variant: str = "sync",
                 forward_iter: int = 40, backward_iter: int = 8, tol: float | None = None) -> None:
        super().__init__()
        self.net = HopfieldNet(layers, model)
        self.settings = variant_settings(model, variant, len(layers), forward_iter, backward_iter)
        if self.settings["even_odd"] and self.net.n_states % 2:
            raise ValueError("even/odd variants need an odd number of layers (input and output even)")
        fmod = (_EvenOddFunction if self.settings["even_odd"] else _SyncFunction)(self.net)
        s = self.settings
        self.deq = DEQ(fmod, None, forward_kwargs=dict(solver=s["solver"], iter=s["forward_iter"], tol=tol),
                       backward_kwargs=dict(solver="picard", iter=s["backward_iter"], method="backprop"),
                       damping_factor=s["damping"])

    def initial_state(self, x: Tensor) -> tuple[Tensor, ...]:
        """Zero state (all layers, or the even layers for the even/odd variants)."""
        init = self.net.zero_state(x.shape[0], x)
        return tuple(init[i] for i in self.net.even) if self.settings["even_odd"] else init

    def equilibrium(self, x: Tensor) -> tuple[Tensor, ...]:
        """Solver output: all layers (sync variants) or the even layers (even/odd variants)."""
        return self.deq(x, self.initial_state(x))

    def full_state(self, x: Tensor) -> tuple[Tensor, ...]:
        """Equilibrium of all layers (odd layers completed from the even ones for even/odd variants)."""
        z = self.equilibrium(x)
        if not self.settings["even_odd"]:
            return z
        return tuple(self.net.odd_from_even(self.net.preprocess_inputs(x), z))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 28, 28) or (B, 784) images -> (B, d_L) output-layer states."""
        return self.equilibrium(x)[-1]

    def set_tol(self, tol: float | None) -> None:
        self.deq.forward_kwargs["tol"] = tol


def hopfield_loss(out: Tensor, labels: Tensor) -> Tensor:
    """0.5 * ||s_L - onehot(y)||^2 averaged over the batch (hopdeq)."""
    return 0.5 * (out - F.one_hot(labels, out.shape[-1]).to(out.dtype)).pow(2).sum() / out.shape[0]


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------
def convergence_iterations(per_sample: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """(n_iter, B) residual log -> per-sample first iteration (1-based) with residual < tol
    (n_iter if never) and a converged mask."""
    below = per_sample < tol
    converged = below.any(0)
    first = below.float().argmax(0) + 1
    return torch.where(converged, first, torch.full_like(first, per_sample.shape[0])), converged


def train_epoch(model: HopfieldClassifier, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
                batch_size: int, generator: torch.Generator) -> float:
    """One pass over (images, labels) in shuffled mini-batches (last partial batch dropped)."""
    model.train()
    order = torch.randperm(images.shape[0], generator=generator)
    total, n = 0.0, 0
    for start in range(0, images.shape[0] - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        loss = hopfield_loss(model(images[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, n = total + loss.item(), n + 1
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model: HopfieldClassifier, images: Tensor, labels: Tensor, batch_size: int,
             conv_tol: float = 1e-4) -> dict:
    """Accuracy and convergence on a set. The solver stops once every sample of a batch has relative
    residual < conv_tol (or at the budget); iterations = per-sample first iteration below conv_tol
    (budget if never), t2c = iterations * (1 - damping) (forward-Euler time, hopdeq's metric)."""
    model.eval()
    previous_tol = model.deq.forward_kwargs["tol"]
    model.set_tol(conv_tol)
    correct, iters, conv, seconds, batches = 0, [], [], 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        xb, yb = images[start:start + batch_size], labels[start:start + batch_size]
        out = model(xb)
        stats = model.deq.last_stats
        it, ok = convergence_iterations(stats["residuals_per_sample"], conv_tol)
        correct += int((out.argmax(-1) == yb).sum())
        iters.append(it.float())
        conv.append(ok.float())
        seconds += stats["seconds"]
        batches += 1
    model.set_tol(previous_tol)
    iters_t = torch.cat(iters)
    return {"acc": 100.0 * correct / images.shape[0], "iters": float(iters_t.mean()),
            "t2c": float(iters_t.mean()) * (1.0 - model.settings["damping"]),
            "not_converged_pct": 100.0 * (1.0 - float(torch.cat(conv).mean())),
            "ms_per_batch": 1000.0 * seconds / max(batches, 1)}


@torch.no_grad()
def residual_curve(model: HopfieldClassifier, images: Tensor) -> list[float]:
    """Geometric-mean relative residual per iteration over ``images`` for the full budget (no early stop)."""
    model.eval()
    previous_tol = model.deq.forward_kwargs["tol"]
    model.set_tol(None)
    model(images)
    model.set_tol(previous_tol)
    per_sample = model.deq.last_stats["residuals_per_sample"].clamp_min(1e-30)
    return (10 ** per_sample.log10().mean(1)).tolist()


def load_split(split: str, size: int | None, data_dir: str | None, seed: int) -> tuple[Tensor, Tensor]:
    """MNIST split as (N, 784) float32 / int64 tensors; a seeded random subset if ``size`` is given."""
    from datasets import load_mnist

    images, labels = load_mnist(split, data_dir)
    images, labels = torch.tensor(images).reshape(len(images), -1), torch.tensor(labels)
    if size is not None and size < len(labels):
        idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:size]
        images, labels = images[idx], labels[idx]
    return images, labels


def train_and_evaluate(config: dict, report=None) -> dict:
    """One run: train a HopfieldClassifier (config: model, variant, layers, lr, epochs, batch_size,
    forward_iter, backward_iter, seed, train_size, test_size, data_dir, conv_tol) and evaluate it.
    The training forward solves stop early once every sample of a batch has residual < conv_tol (hopdeq
    always runs the full budget; the fixed point, hence the gradient, is the same to that tolerance)."""
    from training import seed_everything

    seed_everything(config["seed"])
    train_x, train_y = load_split("train", config["train_size"], config["data_dir"], config["seed"])
    test_x, test_y = load_split("test", config["test_size"], config["data_dir"], 0)
    model = HopfieldClassifier(config["layers"], config["model"], config["variant"],
                               config["forward_iter"], config["backward_iter"], tol=config["conv_tol"])
    optimizer = Madam(model.parameters(), lr=config["lr"], p_scale=1024.0, g_bound=3.0)
    epochs = config["epochs"]
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=max(epochs - 1, 1))
    generator = torch.Generator().manual_seed(config["seed"])
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_loss = train_epoch(model, optimizer, train_x, train_y, config["batch_size"], generator)
        scheduler.step()
        if report is not None and epoch < epochs:
            report({"epoch": epoch, "train_loss": train_loss})
    train_seconds = time.perf_counter() - start
    metrics = evaluate(model, test_x, test_y, config["batch_size"], config["conv_tol"])
    metrics.update(epoch=epochs, train_loss=train_loss, train_seconds=train_seconds,
                   residual_curve=residual_curve(model, test_x[:256]))
    if report is not None:
        report(metrics)
    return metrics


def ray_trainable(config: dict) -> None:
    """Ray Tune trial: one (model, variant, seed) run, reporting per epoch and the final metrics."""
    from ray import tune

    from training import trial_device

    trial_device(config)
    train_and_evaluate(config, report=tune.report)


# --------------------------------------------------------------------------------------------------
# Experiment CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from training import add_ray_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="chn", choices=MODELS + ("both",))
    parser.add_argument("--variant", default="all", choices=VARIANTS + ("all",))
    parser.add_argument("--layers", default="784,1990,10",
                        help="comma-separated layer sizes; the paper's: 784,1990,10 / 784,1280,510,200,10 / "
                             "784,1024,512,256,128,70,10")
    parser.add_argument("--lr", type=float, default=None,
                        help="Madam learning rate (default: the paper's, 0.01 for 3 layers, else 0.005)")
    parser.add_argument("--runs", type=int, default=5, help="independent runs (seeds seed..seed+runs-1)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (the paper used 10)")
    parser.add_argument("--train_size", type=int, default=10000,
                        help="random training subset per run (0 = all 60000)")
    parser.add_argument("--test_size", type=int, default=0, help="test subset (0 = all 10000)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--forward_iter", type=int, default=40, help="base forward budget (hopdeq-scaled)")
    parser.add_argument("--backward_iter", type=int, default=8, help="base backprop steps (hopdeq-scaled)")
    parser.add_argument("--conv_tol", type=float, default=1e-4, help="relative residual counted as converged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="MNIST directory (default: datasets/data)")
    parser.add_argument("--results_dir", default="results/hopfield_deq")
    parser.add_argument("--imgs_dir", default="imgs")
    parser.add_argument("--no_ray", action="store_true",
                        help="run the trials one after another in this process instead of as Ray Tune "
                             "trials (no resume; for tests and debugging)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 run, 256 train / 128 test images, 1 epoch, small budgets")
    add_ray_args(parser, default_exp_name="hopfield_deq")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.epochs, args.train_size, args.test_size = 1, 1, 256, 128
        args.forward_iter, args.backward_iter = min(args.forward_iter, 20), min(args.backward_iter, 4)
        if args.exp_name == "hopfield_deq":
            args.exp_name = "hopfield_deq_quick"
    return args


def aggregate(trials: list[dict]) -> list[dict]:
    """Mean and std over runs per (model, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        groups.setdefault((t["config"]["model"], t["config"]["variant"]), []).append(t["metrics"])
    rows = []
    for (model, variant), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]))):
        row = {"model": model, "variant": variant, "runs": len(ms)}
        for key in ("acc", "iters", "t2c", "not_converged_pct", "ms_per_batch", "train_seconds"):
            vals = np.array([m[key] for m in ms], dtype=float)
            row[f"{key}_mean"], row[f"{key}_std"] = float(vals.mean()), float(vals.std(ddof=1) if len(vals) > 1 else 0.0)
        row["paper_t2c"] = PAPER_T2C[variant] if model == "chn" else float("nan")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], layers: Sequence[int]) -> str:
    lines = [f"Hopfield DEQ variants on MNIST, layers {list(layers)} (mean ± std over runs)", "",
             "| model | variant | test acc % | iterations to res<tol | forward-Euler time (t2c) "
             "| paper t2c (CHN) | not converged % | ms / batch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "" if math.isnan(r["paper_t2c"]) else f"{r['paper_t2c']:.1f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} "
                     f"| {r['iters_mean']:.1f} ± {r['iters_std']:.1f} | {r['t2c_mean']:.1f} ± {r['t2c_std']:.1f} "
                     f"| {paper} | {r['not_converged_pct_mean']:.1f} | {r['ms_per_batch_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_residuals(trials: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({t["config"]["model"] for t in trials})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in VARIANTS:
            curves = [t["metrics"]["residual_curve"] for t in trials
                      if t["config"]["model"] == model and t["config"]["variant"] == variant]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean_log = np.mean([np.log10(np.asarray(c[:n], dtype=float)) for c in curves], axis=0)
            ax.semilogy(np.arange(1, n + 1), 10 ** mean_log, label=variant)
        ax.axhline(1e-4, color="gray", ls=":", lw=1)
        ax.set(title=f"{model.upper()}", xlabel="iteration (map evaluations)",
               ylabel="relative residual ||f(z)-z|| / ||f(z)||")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_locally(param_space: dict) -> list[dict]:
    """Expand the grid of ``param_space`` and run every trial in this process (``--no_ray``)."""
    import itertools

    grid_keys = [k for k, v in param_space.items() if isinstance(v, dict) and "grid_search" in v]
    fixed = {k: v for k, v in param_space.items() if k not in grid_keys}
    trials = []
    for values in itertools.product(*(param_space[k]["grid_search"] for k in grid_keys)):
        config = {**fixed, **dict(zip(grid_keys, values))}
        print("trial", {k: config[k] for k in grid_keys}, flush=True)
        trials.append({"config": config, "metrics": train_and_evaluate(config)})
    return trials


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from training import log_config, run_trials

    args = parse_args(argv)
    layers = [int(v) for v in args.layers.split(",")]
    lr = args.lr if args.lr is not None else (0.01 if len(layers) == 3 else 0.005)
    results_dir, imgs_dir = Path(args.results_dir), Path(args.imgs_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    imgs_dir.mkdir(parents=True, exist_ok=True)
    log_config(args, results_dir / "config.json")
    from ray import tune

    models = list(MODELS) if args.model == "both" else [args.model]
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    param_space = {"model": tune.grid_search(models), "variant": tune.grid_search(variants),
                   "seed": tune.grid_search(list(range(args.seed, args.seed + args.runs))),
                   "layers": layers, "lr": lr, "epochs": args.epochs, "batch_size": args.batch_size,
                   "forward_iter": args.forward_iter, "backward_iter": args.backward_iter,
                   "train_size": args.train_size or None, "test_size": args.test_size or None,
                   "data_dir": None if args.data_dir is None else str(Path(args.data_dir).resolve()),
                   "conv_tol": args.conv_tol}
    if args.no_ray:
        trials = run_locally(param_space)
    else:
        trials = run_trials(ray_trainable, param_space, args, metric="acc", mode="max")
    rows = aggregate(trials)
    import pandas as pd

    pd.DataFrame([{**t["config"], **{k: v for k, v in t["metrics"].items() if not isinstance(v, list)}}
                  for t in trials]).to_csv(results_dir / "runs.csv", index=False)
    pd.DataFrame(rows).to_csv(results_dir / "summary.csv", index=False)
    table = markdown_table(rows, layers)
    (results_dir / "summary.md").write_text(table)
    plot_residuals(trials, imgs_dir / "hopfield_deq_residuals.png")
    print(table)
    print(f"wrote {results_dir / 'runs.csv'}, {results_dir / 'summary.csv'}, {results_dir / 'summary.md'}, "
          f"{imgs_dir / 'hopfield_deq_residuals.png'}")
    return rows


if __name__ == "__main__":
    main()
