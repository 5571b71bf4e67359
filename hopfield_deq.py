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

Precision: float32 throughout (no --precision choice but fp32). Convergence is a relative residual
< 1e-4, below the rounding of bf16 (2^-8) and fp16 (2^-11), so autocast would stall the solvers.

Every (model, variant, seed) run is a Ray Tune trial (``training.run_trials``); each finished run writes
``<results_dir>/<exp_name>/trials/<model>_<variant>_seed<k>_<hash>.json`` and a rerun skips those (commit
them to checkpoint a long sweep). Between epochs a run keeps its training state in the git-ignored
``<results_dir>/<exp_name>/partial/``, so a run interrupted on this machine resumes after its last epoch,
bit for bit (``train_and_evaluate``); on another machine it starts over. Reopening an experiment with other
settings is refused.

    python3 hopfield_deq.py --quick      # seconds; writes results/quick/ (git-ignored)
    python3 hopfield_deq.py              # reduced budget: CHN, 1 epoch on 10,000 images, 5 runs
    python3 hopfield_deq.py --full       # the paper's budget: CHN + HAM, 10 epochs on 60,000, 3 runs
"""
from __future__ import annotations

import argparse
import json
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

REPO_DIR = Path(__file__).resolve().parent

VARIANTS = ("sync", "deq", "eo", "eo_deq")
# The deq variants' forward solver (deq.py): ours, or hopdeq's own Anderson (memory 4, as hopdeq) to compare.
DEQ_SOLVERS = {"anderson": {"m": 5}, "anderson_hopdeq": {"m": 4}}
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


_TABLE_RANGE, _TABLE_STEP = 32.0, 1.0 / 2048.0
_TABLE_SIZE = int(_TABLE_RANGE / _TABLE_STEP) + 1  # grid points per sign
_SIG_M2 = 1.0 / (1.0 + math.exp(2.0))  # rho(0) = sigmoid(-2)
_RHO_PRIME_0 = 4.0 * _SIG_M2 * (1.0 - _SIG_M2)
_TABLES: dict = {}


def _initial_guess_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """g(c) = h(c) / c (h(c) the root of s = rho'(s) c; g(0) = rho'(0)) at c = +x and then c = -x for
    x = 0, 1/2048, ..., 32: solved once in float64 (seeded from a coarse grid) and cached per dtype/device.
    g is smooth and positive, so linear interpolation of g in |c| is accurate to ~6e-7 relative (tested):
    below the solver's float32 tolerance, so a float32 solve usually ends at its first check."""
    key = (dtype, device)
    if key not in _TABLES:
        coarse = torch.linspace(0.0, _TABLE_RANGE, 1025, dtype=torch.float64)
        fine = torch.arange(_TABLE_SIZE, dtype=torch.float64) * _TABLE_STEP
        halves = []
        for sign in (1.0, -1.0):
            t_coarse = _solve_chn_block(sign * coarse, 1e-13, 200, 0.42 * coarse).abs()
            t0 = torch.from_numpy(np.interp(fine.numpy(), coarse.numpy(), t_coarse.numpy()))
            ratio = _solve_chn_block(sign * fine, 1e-13, 100, t0).abs() / fine
            ratio[0] = _RHO_PRIME_0
            halves.append(ratio)
        _TABLES[key] = torch.cat(halves).to(dtype=dtype, device=device)
    return _TABLES[key]


def _indicator(compare, x: Tensor, y: Tensor | float) -> Tensor:
    """1.0 where ``compare(x, y)`` holds, else 0.0, as a float tensor of x's dtype (a comparison written
    straight into a float output: on the CPU a bool mask plus ``torch.where`` costs ~10x more)."""
    return compare(x, y, out=torch.empty_like(x))


def _select(weight: Tensor, if_one: Tensor, if_zero: Tensor) -> Tensor:
    """``if_one`` where weight == 1, ``if_zero`` where weight == 0, exactly (lerp returns its end points
    bit for bit at weights 0 and 1 when both are finite); the float form of ``torch.where``."""
    return torch.lerp(if_zero, if_one, weight)


def _table_guess(c: Tensor) -> Tensor:
    """|h(c)| ~ |c| g(|c|) with g linearly interpolated in the cached table of c's sign (|c| > 32: the
    table's end value |h(+-32)|, which the bracketed Newton iteration then corrects). |c| / step is exact
    in floating point (the step is a power of two), so the guess is accurate for tiny |c| too."""
    table = _initial_guess_table(c.dtype, c.device)
    x = c.abs()
    pos = (x * (1.0 / _TABLE_STEP)).clamp(max=_TABLE_SIZE - 1)
    idx = pos.floor().clamp(max=_TABLE_SIZE - 2)
    frac = pos - idx
    flat = (idx + _TABLE_SIZE * _indicator(torch.lt, c, 0.0)).long().view(-1)
    left, right = table.index_select(0, flat).view_as(c), table[1:].index_select(0, flat).view_as(c)
    return x.clamp(max=_TABLE_RANGE) * torch.lerp(left, right, frac)


def _solve_chn_block(c: Tensor, tol: float, max_iter: int, t0: Tensor | None = None) -> Tensor:
    """Root of s = rho'(s) c per entry. s has the sign of c and |s| <= |c| (rho' <= 1); with t = |s|,
    u(t) = log(t / (|c| rho'(sign(c) t))) is strictly increasing in t, and Newton steps on u are kept
    inside a shrinking bracket [lo, hi] (falling back to bisection). Started from an interpolated
    table of h (``t0`` overrides), Newton typically needs 1-2 steps. Every selection is done in float
    arithmetic (``_indicator`` / ``_select``), which gives the same iterates as boolean masks with
    ``torch.where`` (bit for bit, tested) at a fraction of the cost."""
    tiny = torch.finfo(c.dtype).tiny
    sign = torch.sign(c)
    abs_c = c.abs().clamp_min(tiny)
    nonzero = _indicator(torch.ne, c, 0.0)
    lo, hi = torch.zeros_like(c), abs_c.clone()
    t = _table_guess(c) if t0 is None else t0
    t = torch.minimum(t.clamp_min(tiny), abs_c)
    for _ in range(max_iter):
        a = 4.0 * (sign * t - 0.5)
        r_pos, r_neg = torch.sigmoid(a), torch.sigmoid(-a)  # rho and 1 - rho, both accurate
        u = torch.log(t / (4.0 * abs_c * r_pos * r_neg).clamp_min(tiny)) * nonzero  # c = 0: u = 0 (finite there)
        if float(u.abs().amax()) < tol:  # every |u| < tol (a NaN keeps iterating, as .all() would)
            break
        below = _indicator(torch.lt, u, 0.0)  # the root lies above t
        lo, hi = _select(below, t, lo), _select(below, hi, t)
        t_newton = t - u / (1.0 / t + 4.0 * sign * (r_pos - r_neg))  # u'(t) = 1/t + 4 sign (2 rho - 1)
        cand = torch.minimum(torch.maximum(t_newton, lo), hi)
        # Newton left the bracket and its clamp makes no progress: bisect
        stuck = torch.minimum(_indicator(torch.ne, cand, t_newton),
                              _indicator(torch.eq, cand, t) + _indicator(torch.le, cand, 0.0))
        t = _select(stuck, 0.5 * (lo + hi), cand)
    return sign * t  # 0 where c = 0


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
                     backward_iter: int = 8, deq_solver: str = "anderson") -> dict:
    """Solver (``deq_solver`` for the deq variants, Picard otherwise), its memory, damping and
    (hopdeq-scaled) iteration budgets of a variant."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if deq_solver not in DEQ_SOLVERS:
        raise ValueError(f"deq_solver must be one of {tuple(DEQ_SOLVERS)}, got {deq_solver!r}")
    even_odd = variant.startswith("eo")
    damping = 0.5 if (model == "chn" and not even_odd) else 0.0
    scale = int((n_layers // 2) / (1.0 - damping))
    return {"solver": deq_solver if variant.endswith("deq") else "picard", "m": DEQ_SOLVERS[deq_solver]["m"],
            "even_odd": even_odd, "damping": damping, "forward_iter": forward_iter * scale, "backward_iter": backward_iter * scale}


class HopfieldClassifier(nn.Module):
    """MNIST classifier: image -> equilibrium of a HopfieldNet (one variant) -> output-layer state."""

    def __init__(self, layers: Sequence[int], model: str = "chn", variant: str = "sync",
                 forward_iter: int = 40, backward_iter: int = 8, tol: float | None = None,
                 deq_solver: str = "anderson") -> None:
        super().__init__()
        self.net = HopfieldNet(layers, model)
        self.settings = variant_settings(model, variant, len(layers), forward_iter, backward_iter, deq_solver)
        if self.settings["even_odd"] and self.net.n_states % 2:
            raise ValueError("even/odd variants need an odd number of layers (input and output even)")
        fmod = (_EvenOddFunction if self.settings["even_odd"] else _SyncFunction)(self.net)
        s = self.settings
        self.deq = DEQ(fmod, None, forward_kwargs=dict(solver=s["solver"], iter=s["forward_iter"], tol=tol, m=s["m"]),
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


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
MNIST_SIZES = {"train": 60_000, "test": 10_000}


def subset(images: np.ndarray, labels: np.ndarray, size: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """(N, 784) float32 / int64 tensors of a seeded random subset of ``size`` images (None: all)."""
    images, labels = torch.tensor(images).reshape(len(images), -1), torch.tensor(labels)
    if size is not None and size < len(labels):
        idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:size]
        images, labels = images[idx], labels[idx]
    return images, labels


def load_split(split: str, size: int | None, data_dir: str | None, seed: int) -> tuple[Tensor, Tensor]:
    """MNIST split as (N, 784) float32 / int64 tensors; a seeded random subset if ``size`` is given."""
    from datasets import load_mnist

    return subset(*load_mnist(split, data_dir), size, seed)


def load_data(data_dir: str | None) -> dict:
    """Both MNIST splits as read-only numpy arrays (every file checked against its SHA-256 first)."""
    from datasets import load_mnist

    return {split: load_mnist(split, data_dir) for split in MNIST_SIZES}


def data_digest() -> str:
    """Identity of the data: sha1 of the manifest SHA-256 of the four MNIST files (every load verifies the
    files against them, so a trial can only ever see exactly these bytes)."""
    import hashlib

    from datasets import MANIFEST
    from datasets.mnist import MNIST_FILES

    names = sorted(name for pair in MNIST_FILES.values() for name in pair)
    return hashlib.sha1("".join(MANIFEST[name].sha256 for name in names).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Trial
# --------------------------------------------------------------------------------------------------
def train_and_evaluate(config: dict, data: dict, report=None, resume_path: Path | None = None) -> dict:
    """One run: train a HopfieldClassifier (config: model, variant, layers, lr, epochs, batch_size,
    forward_iter, backward_iter, seed, train_size, test_size, conv_tol, optional deq_solver (default
    'anderson'); precision must be fp32) on
    ``data`` (``load_data``) and evaluate it. The training subset is drawn with the run's seed, the test
    subset with seed 0 (the same for every run). The training forward solves stop early once every sample
    of a batch has residual < conv_tol (hopdeq always runs the full budget; the fixed point, hence the
    gradient, is the same to that tolerance).

    ``resume_path``: after every epoch the training state (weights, Madam and schedule state, shuffling and
    global RNG, the epoch reports) is saved there atomically, and a run whose file holds the same config
    continues after its last saved epoch: bit for bit the run it would have been without the interruption."""
    from training import seed_everything, trial_identity

    if config.get("precision", "fp32") != "fp32":
        raise ValueError(f"hopfield_deq runs in float32 only, got precision {config['precision']!r}")
    seed_everything(config["seed"])
    train_x, train_y = subset(*data["train"], config["train_size"], config["seed"])
    test_x, test_y = subset(*data["test"], config["test_size"], 0)
    model = HopfieldClassifier(config["layers"], config["model"], config["variant"],
                               config["forward_iter"], config["backward_iter"], tol=config["conv_tol"],
                               deq_solver=config.get("deq_solver", "anderson"))
    optimizer = Madam(model.parameters(), lr=config["lr"], p_scale=1024.0, g_bound=3.0)
    epochs = config["epochs"]
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=max(epochs - 1, 1))
    generator = torch.Generator().manual_seed(config["seed"])
    state = TrainingState(trial_identity(config), model, optimizer, scheduler, generator)
    done, reports, seconds_before = state.load(resume_path)
    for past in reports:  # the interrupted run's epochs, so the trial's history is complete
        if report is not None:
            report(past)
    start = time.perf_counter() - seconds_before
    train_loss = reports[-1]["train_loss"] if reports else math.nan
    for epoch in range(done + 1, epochs + 1):
        train_loss = train_epoch(model, optimizer, train_x, train_y, config["batch_size"], generator)
        scheduler.step()
        if epoch < epochs:
            reports.append({"epoch": epoch, "train_loss": train_loss, "train_seconds": time.perf_counter() - start})
            if report is not None:
                report(reports[-1])
            state.save(resume_path, epoch, reports, time.perf_counter() - start)
    train_seconds = time.perf_counter() - start
    metrics = evaluate(model, test_x, test_y, config["batch_size"], config["conv_tol"])
    metrics.update(epoch=epochs, train_loss=train_loss, train_seconds=train_seconds,
                   residual_curve=residual_curve(model, test_x[:256]))
    if report is not None:
        report(metrics)
    return metrics


class TrainingState:
    """The resumable state of one run between epochs (``train_and_evaluate``'s ``resume_path``)."""

    def __init__(self, config: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator) -> None:
        self.config, self.model, self.optimizer = config, model, optimizer
        self.scheduler, self.generator = scheduler, generator

    def save(self, path: Path | None, epoch: int, reports: list[dict], train_seconds: float) -> None:
        """Write the state after ``epoch`` to ``path`` (a temporary file renamed over it: never half-written)."""
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"config": self.config, "epoch": epoch, "reports": reports, "train_seconds": train_seconds,
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                    "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(path)

    def load(self, path: Path | None) -> tuple[int, list[dict], float]:
        """Restore the state saved at ``path`` if it belongs to this config: (epochs done, their reports, train
        seconds so far); (0, [], 0.0) when there is none."""
        if path is None or not path.exists():
            return 0, [], 0.0
        saved = torch.load(path, weights_only=False)
        if saved["config"] != self.config:
            return 0, [], 0.0
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        print(f"resuming after epoch {saved['epoch']} from {path}", flush=True)
        return saved["epoch"], saved["reports"], saved["train_seconds"]


def ray_trainable(config: dict, data: dict, resume_dir: str | None = None) -> None:
    """Ray Tune trial: one (model, variant, seed) run, reporting per epoch and the final metrics; with
    ``resume_dir`` its training state is kept there between epochs (``train_and_evaluate``)."""
    from ray import tune

    from training import trial_device, trial_identity, trial_key

    trial_device(config)
    name = f"{trial_label(config)}_{trial_key(trial_identity(config))}.pt"
    path = None if resume_dir is None else Path(resume_dir) / name
    train_and_evaluate(config, data, report=tune.report, resume_path=path)
    if path is not None:  # finished: its trial file (written by the driver) replaces the saved state
        path.unlink(missing_ok=True)


def run_locally(configs: list[dict], data: dict) -> list[dict]:
    """``--no_ray``: every trial in this process, one after another (records shaped as ``run_trials``'s;
    no trial files, nothing resumed)."""
    from training import cpu_model, git_commit

    trials = []
    for config in configs:
        print("trial", trial_label(config), flush=True)
        start = time.perf_counter()
        metrics = train_and_evaluate(config, data)
        trials.append({"config": config, "metrics": metrics, "history": [metrics],
                       "wall_time_s": time.perf_counter() - start, "git_commit": git_commit(), "cpu": cpu_model()})
    return trials


# --------------------------------------------------------------------------------------------------
# Experiment CLI
# --------------------------------------------------------------------------------------------------
# Budgets: the default (a reduced budget: 1 epoch on 10,000 images), --quick (a seconds-long smoke run)
# and --full (the paper's: 10 epochs on all 60,000 training images). Explicit flags win over all three.
DEFAULTS = dict(model="chn", variant="all", runs=5, epochs=1, train_size=10_000, test_size=0, batch_size=64,
                forward_iter=40, backward_iter=8)
QUICK = dict(runs=1, epochs=1, train_size=256, test_size=128, forward_iter=20, backward_iter=4)
FULL = dict(model="both", variant="all", runs=3, epochs=10, train_size=0, test_size=0)
# Where each budget writes (results, figure) by default: smoke runs never touch the committed results.
OUTPUT_DIRS = {"default": ("results/hopfield_deq", "imgs"), "quick": ("results/quick/hopfield_deq", "results/quick/imgs"),
               "full": ("results/hopfield_deq_full", "results/hopfield_deq_full")}
PRECISION_NOTE = ("float32 only: convergence is measured as a relative residual < 1e-4, below bf16's "
                  "rounding (2^-8 = 4e-3) and fp16's (2^-11 = 5e-4), so autocast would stall the solvers")


def _by_budget(which: int) -> str:
    names = {"default": "plain run", "quick": "--quick", "full": "--full"}
    return ", ".join(f"{names[k]} {v[which]}" for k, v in OUTPUT_DIRS.items())


def layer_sizes(text: str) -> list[int]:
    """argparse type of --layers: comma-separated positive sizes, 784 first (MNIST), 10 last, >= 3 layers."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(sizes) < 3 or sizes[0] != 784 or sizes[-1] != 10 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need >= 3 positive sizes, 784 first (the MNIST input) and "
                                         "10 last (the classes), e.g. 784,1990,10")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from training import add_ray_args, nonnegative_int, open_fraction, positive_float, positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = "default %s; --quick %s; --full %s"
    task = parser.add_argument_group("task and budget (explicit flags win over --quick / --full)")
    task.add_argument("--model", default=None, choices=MODELS + ("both",), help="default chn; --full both")
    task.add_argument("--variant", default=None, choices=VARIANTS + ("all",), help="default all")
    task.add_argument("--layers", type=layer_sizes, default=[784, 1990, 10],
                      help="comma-separated layer sizes (default 784,1990,10); the paper's: 784,1990,10 / "
                           "784,1280,510,200,10 / 784,1024,512,256,128,70,10")
    task.add_argument("--lr", type=positive_float, default=None,
                      help="Madam learning rate (default: the paper's, 0.01 for 3 layers, else 0.005)")
    task.add_argument("--runs", type=positive_int, default=None,
                      help="independent runs, seeds seed..seed+runs-1 (" + budget % (5, 1, 3) + ")")
    task.add_argument("--epochs", type=positive_int, default=None,
                      help="training epochs (" + budget % (1, 1, "10, the paper's") + ")")
    task.add_argument("--train_size", type=nonnegative_int, default=None,
                      help="random training subset per run, 0 = all 60000 (" + budget % ("10000", 256, "0") + ")")
    task.add_argument("--test_size", type=nonnegative_int, default=None,
                      help="test subset, 0 = all 10000 (" + budget % (0, 128, 0) + ")")
    task.add_argument("--batch_size", type=positive_int, default=None, help="default 64 (the paper's)")
    task.add_argument("--forward_iter", type=positive_int, default=None,
                      help="base forward budget, scaled as in hopdeq (" + budget % (40, 20, 40) + ")")
    task.add_argument("--backward_iter", type=positive_int, default=None,
                      help="base backprop steps, scaled as in hopdeq (" + budget % (8, 4, 8) + ")")
    task.add_argument("--conv_tol", type=open_fraction, default=1e-4,
                      help="relative residual counted as converged (default 1e-4)")
    task.add_argument("--seed", type=int, default=0, help="runs use seeds seed, seed+1, ... (default 0)")
    task.add_argument("--deq_solver", default="anderson", choices=tuple(DEQ_SOLVERS),
                      help="forward solver of the deq variants: ours (default, memory 5) or hopdeq's own Anderson "
                           "(memory 4, fixed 1e-10 Tikhonov term, its Picard safeguard; deq.anderson_hopdeq), to "
                           "compare the two; with --variant deq or eo_deq only, written beside the budget's "
                           "results as <results_dir>_anderson_hopdeq/")
    preset = task.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help=f"seconds-long smoke run {QUICK}, written to "
                        f"{OUTPUT_DIRS['quick'][0]}/ (git-ignored)")
    preset.add_argument("--full", action="store_true", help=f"the paper's budget {FULL} (batch 64, Madam, 40/8 "
                        f"iterations), written to {OUTPUT_DIRS['full'][0]}/")
    task.add_argument("--precision", default="fp32", choices=("fp32",), help=PRECISION_NOTE)
    out = parser.add_argument_group("data and outputs")
    out.add_argument("--data_dir", default=None, help="MNIST directory (default: datasets/data)")
    out.add_argument("--results_dir", default=None,
                     help="CSV/JSON/markdown results and the trial files under <exp_name>/trials/ (default: "
                          + _by_budget(0) + ")")
    out.add_argument("--imgs_dir", default=None, help="residual plot (default: " + _by_budget(1) + ")")
    out.add_argument("--report", action="store_true",
                     help="only rebuild the README's hopdeq tables from the committed results (paper-budget trial "
                          "files, reduced-budget summaries) and print them; runs nothing")
    out.add_argument("--no_ray", action="store_true",
                     help="run the trials one after another in this process instead of as Ray Tune trials "
                          "(no trial files, no resume; for tests and debugging)")
    add_ray_args(parser, default_exp_name="auto")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag (before any data is read or Ray started); fill the budget's defaults."""
    from training import RAY_FLAGS, check_ray_args, refuse_flags_besides

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        refuse_flags_besides(parser, args, "report", (), "rebuilds the README tables from the committed results")
        return args
    given_to_ray = [name for name in RAY_FLAGS if getattr(args, name) != parser.get_default(name)]
    if args.no_ray and given_to_ray:
        parser.error(f"--no_ray runs the trials in this process, without Ray: "
                     f"{', '.join('--' + name for name in given_to_ray)} would be ignored")
    budget = "quick" if args.quick else "full" if args.full else "default"
    for name, value in {**DEFAULTS, **{"quick": QUICK, "full": FULL}.get(budget, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr is None:
        args.lr = 0.01 if len(args.layers) == 3 else 0.005
    if args.variant in ("eo", "eo_deq", "all") and len(args.layers) % 2 == 0:
        parser.error(f"--layers {','.join(map(str, args.layers))}: the even/odd variants need an odd number of "
                     "layers (input and output even); use --variant sync or deq, or an odd count")
    for split in MNIST_SIZES:
        value = getattr(args, f"{split}_size")
        if value > MNIST_SIZES[split]:
            parser.error(f"--{split}_size {value}: MNIST has {MNIST_SIZES[split]} {split} images (allowed: 0 = all, "
                         f"or 1..{MNIST_SIZES[split]})")
    if 0 < args.train_size < args.batch_size:
        parser.error(f"--train_size {args.train_size} is below --batch_size {args.batch_size}: no full batch to "
                     "train on (the last partial batch is dropped)")
    if args.deq_solver != "anderson" and args.variant not in ("deq", "eo_deq"):
        parser.error(f"--deq_solver {args.deq_solver} is the forward solver of the deq variants; give --variant deq "
                     f"or eo_deq (got --variant {args.variant}: sync and eo use Picard steps)")
    results_dir, imgs_dir = OUTPUT_DIRS[budget]
    if args.deq_solver != "anderson":  # its own directory: the solver comparison never touches the tables
        results_dir = imgs_dir = f"{results_dir}_{args.deq_solver}"
    args.results_dir = args.results_dir or str(REPO_DIR / results_dir)
    args.imgs_dir = args.imgs_dir or str(REPO_DIR / imgs_dir)
    if args.exp_name == "auto":  # named after the budget; other settings under a reused name are refused
        train = args.train_size or MNIST_SIZES["train"]
        args.exp_name = f"layers{'-'.join(map(str, args.layers))}_epochs{args.epochs}_train{train}"
    check_ray_args(args)
    return args


def experiment_settings(args: argparse.Namespace, digest: str) -> dict:
    """What every trial of the experiment shares (reopening it with other values is refused); model,
    variant and seed pick its trials, so an experiment may grow by them."""
    def size(value: int, split: str) -> int | None:
        return None if value in (0, MNIST_SIZES[split]) else value

    settings = {"layers": list(args.layers), "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                "forward_iter": args.forward_iter, "backward_iter": args.backward_iter,
                "train_size": size(args.train_size, "train"), "test_size": size(args.test_size, "test"),
                "conv_tol": args.conv_tol, "precision": args.precision, "data": digest}
    if args.deq_solver != "anderson":  # absent for ours, so the trial keys of the runs made before it stay
        settings["deq_solver"] = args.deq_solver
    return settings


def trial_configs(args: argparse.Namespace, digest: str) -> list[dict]:
    """model x variant x seed; each config holds everything its result depends on (its trial file's identity)."""
    models = list(MODELS) if args.model == "both" else [args.model]
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    common = experiment_settings(args, digest)
    return [{**common, "model": model, "variant": variant, "seed": args.seed + i}
            for model in models for variant in variants for i in range(args.runs)]


def trial_label(config: dict) -> str:
    """Readable part of a trial file's name."""
    return f"{config['model']}_{config['variant']}_seed{config['seed']}"


def aggregate(trials: list[dict]) -> list[dict]:
    """Mean and std (ddof 1) over runs per (model, variant), beside hopdeq's CHN iteration means."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        groups.setdefault((t["config"]["model"], t["config"]["variant"]), []).append(
            {**t["metrics"], "wall_time_s": t["wall_time_s"]})
    rows = []
    for (model, variant), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]))):
        row = {"model": model, "variant": variant, "runs": len(ms), "precision": "fp32"}
        for key in ("acc", "iters", "t2c", "not_converged_pct", "ms_per_batch", "train_seconds", "wall_time_s"):
            vals = np.array([m[key] for m in ms], dtype=float)
            row[f"{key}_mean"], row[f"{key}_std"] = float(vals.mean()), float(vals.std(ddof=1) if len(vals) > 1 else 0.0)
        row["paper_t2c"] = PAPER_T2C[variant] if model == "chn" else float("nan")
        rows.append(row)
    return rows


def budget_label(settings: dict) -> str:
    """E.g. 'layers [784, 1990, 10], 1 epoch(s) on 10000 training images, batch 64, 40/8 iterations, fp32'."""
    train = settings["train_size"] or MNIST_SIZES["train"]
    test = settings["test_size"] or MNIST_SIZES["test"]
    return (f"layers {settings['layers']}, {settings['epochs']} epoch(s) on {train} training images, "
            f"{test} test images, batch {settings['batch_size']}, lr {settings['lr']:g}, "
            f"{settings['forward_iter']}/{settings['backward_iter']} base iterations, {settings['precision']}")


def markdown_table(rows: list[dict], settings: dict) -> str:
    lines = [f"Hopfield DEQ variants on MNIST: {budget_label(settings)} (mean ± std over runs)", "",
             "| model | variant | runs | test acc % | iterations to res<tol | forward-Euler time (t2c) "
             "| paper t2c (CHN) | not converged % | ms / batch | train s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['runs']} | {metric_cells(r)} |")
    return "\n".join(lines) + "\n"


def metric_cells(r: dict) -> str:
    """The table cells of one ``aggregate`` row after its runs: acc | iterations | t2c | paper t2c (empty for
    the HAM) | not converged % | ms / batch | train s / run."""
    paper = "" if math.isnan(r["paper_t2c"]) else f"{r['paper_t2c']:.1f}"
    return (f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {r['iters_mean']:.1f} ± {r['iters_std']:.1f} | "
            f"{r['t2c_mean']:.1f} ± {r['t2c_std']:.1f} | {paper} | {r['not_converged_pct_mean']:.1f} | "
            f"{r['ms_per_batch_mean']:.1f} | {r['train_seconds_mean']:.0f}")


def load_experiment_trials(experiment_dir: Path) -> list[dict]:
    """The finished runs whose trial files lie in ``experiment_dir/trials/`` (``metrics`` = last report)."""
    from training import finished_trial

    return [finished_trial(json.loads(path.read_text())) for path in sorted((experiment_dir / "trials").glob("*.json"))]


def full_report(results_dir: Path = REPO_DIR / OUTPUT_DIRS["full"][0]) -> str:
    """Markdown for the README's paper-budget table: per (model, variant) the runs committed so far (of
    ``FULL['runs']``) with mean ± std over them, from the trial files of every experiment under
    ``results_dir``; a pair with no finished run is listed as such."""
    from training import repo_relative, trial_provenance

    blocks = []
    for experiment in sorted(d for d in results_dir.glob("*") if (d / "experiment.json").exists()):
        settings, trials = json.loads((experiment / "experiment.json").read_text()), load_experiment_trials(experiment)
        rows = {(r["model"], r["variant"]): r for r in aggregate(trials)}
        total, prov = len(MODELS) * len(VARIANTS) * FULL["runs"], trial_provenance(trials)
        walls = [t["wall_time_s"] / 60 for t in trials] or [0.0]
        lines = [f"{len(trials)} of {total} runs committed (`{repo_relative(experiment)}/trials/`): "
                 f"{budget_label(settings)}; {prov['trial_wall_time_s'].get('sum', 0) / 3600:.1f} trial hours, "
                 f"{min(walls):.0f}-{max(walls):.0f} min wall per run, on {', '.join(prov['cpus']) or '-'} "
                 "(mean ± std over the runs done)", "",
                 "| model | variant | runs done | test acc % | iterations to res < 1e-4 (the budget if not reached) | forward-Euler time (t2c) "
                 "| paper t2c (hopdeq, CHN) | not converged % | ms / test batch | train s / run |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for model in MODELS:
            for variant in VARIANTS:
                r = rows.get((model, variant))
                if r is None:
                    paper = f"{PAPER_T2C[variant]:.1f}" if model == "chn" else ""
                    lines.append(f"| {model} | {variant} | 0 of {FULL['runs']} | not yet run | | | {paper} | | | |")
                    continue
                lines.append(f"| {model} | {variant} | {r['runs']} of {FULL['runs']} | {metric_cells(r)} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) or "No paper-budget run committed yet (`python3 hopfield_deq.py --full`)."


def solver_report(full_dir: Path = REPO_DIR / OUTPUT_DIRS["full"][0], solver: str = "anderson_hopdeq") -> str:
    """Markdown for the README's solver comparison at the paper's budget: every finished run of
    ``--full --deq_solver <solver>`` (under ``<full_dir>_<solver>/``) beside our Anderson's run of the same
    experiment, model, variant and seed (under ``full_dir``): test accuracy, the training loss of every
    epoch, iterations and not-converged share on the test set."""
    from training import repo_relative

    solver_dir = full_dir.with_name(f"{full_dir.name}_{solver}")
    lines = []
    for experiment in sorted(d for d in solver_dir.glob("*") if (d / "experiment.json").exists()):
        ours = {trial_label(t["config"]): t for t in load_experiment_trials(full_dir / experiment.name)}
        for trial in load_experiment_trials(experiment):
            label = trial_label(trial["config"])
            pair = [("ours (anderson)", ours.get(label)), (f"hopdeq's ({solver})", trial)]
            lines += [_solver_row(trial["config"], name, t) for name, t in pair]
    if not lines:
        return (f"No paper-budget run with `--deq_solver {solver}` committed yet (`python3 hopfield_deq.py --full "
                f"--model chn --variant deq --deq_solver {solver} --runs 1`).")
    epochs = FULL["epochs"]
    head = [f"Runs of `{repo_relative(solver_dir)}/` beside ours of the same seed (`{repo_relative(full_dir)}/`):", "",
            f"| model | variant | seed | forward solver | test acc % | training loss, epochs 1-{epochs} "
            "| iterations to res < 1e-4 (test) | not converged % (test) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines)


def _solver_row(config: dict, solver: str, trial: dict | None) -> str:
    """One line of ``solver_report`` (ours may not have run yet)."""
    lead = f"| {config['model']} | {config['variant']} | {config['seed']} | {solver} |"
    if trial is None:
        return f"{lead} not yet run | | | | |"
    m = trial["metrics"]
    losses = " ".join(f"{h['train_loss']:.3f}" for h in trial["history"])
    return (f"{lead} {m['acc']:.2f} | {losses} | {m['iters']:.1f} | {m['not_converged_pct']:.1f} "
            f"| {m['train_seconds']:.0f} |")


def reduced_report(results_dir: Path = REPO_DIR / "results") -> str:
    """Markdown for the README's reduced-budget CHN table (``results/hopfield_deq/``: labels, mean ± std, the
    sweep's span from its runs.csv) and the HAM iteration and ms / test batch means of
    ``results/hopfield_deq_reduced/``."""
    import pandas as pd

    labels = {"sync": "sync (damping 0.5)", "deq": "deq (Anderson)", "eo": "eo (even/odd)", "eo_deq": "eo_deq"}
    summary = pd.read_csv(results_dir / "hopfield_deq" / "summary.csv")
    runs = pd.read_csv(results_dir / "hopfield_deq" / "runs.csv")
    span = float(runs.timestamp.max() - (runs.timestamp - runs.time_total_s).min())
    chn = summary[summary.model == "chn"]
    lines = [f"{len(runs)} trainings, {int(chn.runs.max())} runs per variant, {span // 60:.0f} min {span % 60:.0f} s "
             "from the first run's start to the last run's end on 2 CPU cores (`results/hopfield_deq/runs.csv`):", "",
             "| variant | test acc % | iterations to residual < 1e-4 | forward-Euler time (t2c) "
             "| paper t2c (hopdeq notebook) | ms / test batch |", "|---|---|---|---|---|---|"]
    for r in chn.itertuples():
        lines.append(f"| {labels[r.variant]} | {r.acc_mean:.1f} ± {r.acc_std:.1f} | {r.iters_mean:.1f} ± {r.iters_std:.1f} "
                     f"| {r.t2c_mean:.1f} ± {r.t2c_std:.1f} | {r.paper_t2c:.1f} | {r.ms_per_batch_mean:.1f} |")
    ham = pd.read_csv(results_dir / "hopfield_deq_reduced" / "summary.csv").set_index(["model", "variant"])

    def per_variant(column: str) -> str:
        return " / ".join(f"{ham.loc[('ham', v), column]:.1f}" for v in VARIANTS)
    lines += ["", f"HAM, reduced run (`results/hopfield_deq_reduced/`, {int(ham.loc[('ham', 'sync'), 'runs'])} runs), "
              f"{' / '.join(VARIANTS)}: iterations {per_variant('iters_mean')}, ms / test batch "
              f"{per_variant('ms_per_batch_mean')}."]
    return "\n".join(lines)


def write_report() -> dict[str, str]:
    """The README blocks (``hopdeq_full``, ``hopdeq_solver``, ``hopdeq_reduced``) from the committed results;
    prints them."""
    import training

    tables = {"hopdeq_full": full_report(), "hopdeq_solver": solver_report(), "hopdeq_reduced": reduced_report()}
    training.write_readme_blocks(tables)
    return tables


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




def write_outputs(rows: list[dict], trials: list[dict], args: argparse.Namespace, config: dict,
                  settings: dict) -> dict[str, Path]:
    """runs.csv (one row per run), summary.{csv,md,json} (json: config, budget, precision, provenance)
    under --results_dir and the residual plot under --imgs_dir."""
    import pandas as pd

    from training import trial_provenance

    results_dir, imgs_dir = Path(args.results_dir), Path(args.imgs_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    imgs_dir.mkdir(parents=True, exist_ok=True)
    files = {name: results_dir / name for name in ("runs.csv", "summary.csv", "summary.md", "summary.json")}
    files["residuals.png"] = imgs_dir / "hopfield_deq_residuals.png"
    pd.DataFrame([{**t["config"], "wall_time_s": t["wall_time_s"], "git_commit": t["git_commit"],
                   "cpu": t.get("cpu", "unrecorded"),
                   **{k: v for k, v in t["metrics"].items() if not isinstance(v, list)}}
                  for t in trials]).to_csv(files["runs.csv"], index=False)
    pd.DataFrame(rows).to_csv(files["summary.csv"], index=False)
    files["summary.md"].write_text(markdown_table(rows, settings))
    payload = {"config": config, "exp_name": args.exp_name, "budget": budget_label(settings),
               "precision": "fp32", "precision_note": PRECISION_NOTE, "summary": rows,
               "provenance": trial_provenance(trials)}
    files["summary.json"].write_text(json.dumps(payload, indent=2, default=str))
    plot_residuals(trials, files["residuals.png"])
    return files


def main(argv: Sequence[str] | None = None) -> list[dict] | dict[str, str]:
    """Check the flags, open the experiment (refused if it was started with other settings), run the trials
    that have no trial file yet, write the results and print the table and where it wrote them; returns the
    summary rows. ``--report``: only the README's tables (returned by block name)."""
    import training

    args = parse_args(argv)
    if args.report:
        return write_report()
    digest = data_digest()
    settings = experiment_settings(args, digest)
    if not args.no_ray:
        trial_dir = training.open_experiment(Path(args.results_dir) / args.exp_name, settings)
    config = training.log_config(args, Path(args.results_dir) / "config.json")
    data = load_data(args.data_dir)
    configs = trial_configs(args, digest)
    if args.no_ray:
        trials = run_locally(configs, data)
    else:
        resume_dir = trial_dir.parent / "partial"  # git-ignored: resumes a run on this machine only
        trials = training.run_trials(ray_trainable, configs, args, trial_dir, label=trial_label,
                                     params={"data": data, "resume_dir": str(resume_dir)})
    rows = aggregate(trials)
    files = write_outputs(rows, trials, args, config, settings)
    print(markdown_table(rows, settings))
    print("wrote:\n" + "\n".join(f"  {training.repo_relative(path)}" for path in files.values()))
    return rows


if __name__ == "__main__":
    main()
