"""Deep-equilibrium (DEQ) core: fixed-point solvers and their gradients.

A DEQ layer outputs the fixed point z* = f(z*, x) of a map f instead of a fixed number of layer
applications (Bai et al. 2019). This module provides

* three solvers on batched states: ``picard`` (z <- f(z)), ``anderson`` (Anderson acceleration with
  memory m and a regularised least-squares mixing, Walker & Ni 2011) and ``anderson_hopdeq`` (hopdeq's
  own Anderson, for comparison: memory 4, fixed Tikhonov term, its safeguard), all with an optional early stop
  at a relative residual ||f(z) - z|| / ||f(z)|| < tol per sample and a per-iteration residual log;
* two ways to differentiate z*: recurrent backprop through the last few map applications started at
  the (detached) fixed point ('backprop' / 'unroll'), and implicit differentiation ('full_adjoint' /
  'implicit') where the incoming gradient v is replaced by the solution g of the adjoint fixed point
  g = (df/dz)^T g + v at z*, so that dL/dtheta = g^T df/dtheta (implicit function theorem);
* ``fixed_point(f, z0, ...)``: a functional entry point for any closure f (used by layers.py), and
* ``DEQ``: an nn.Module following the protocol of hopdeq (Goemaere et al. 2024):
  ``f_module.preprocess_inputs(x) -> Ux`` once, then ``f_module(Ux, z) -> new z``.

Damping d turns the iterated map into f_d(z) = d * z + (1 - d) * f(z) (forward Euler with step 1 - d on
dz/dt = f(z) - z); it has the same fixed points. Residuals, iteration counts and gradients always refer
to the damped map that is actually iterated.

The solvers are written here rather than taken from the ``torchdeq`` package: torchdeq 0.1.0 (2023)
predates torch 2.13, is not otherwise needed by the project, and the two small solvers below are
easy to test exhaustively (see tests/test_deq.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

State = Union[Tensor, Sequence[Tensor]]
SOLVERS = ("picard", "anderson", "anderson_hopdeq")
EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Residuals and state flattening
# --------------------------------------------------------------------------------------------------
def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """Per-sample ||f(z) - z|| / ||f(z)|| for batched flat states (B, D) -> (B,)."""
    return (fz - z).norm(dim=-1) / (fz.norm(dim=-1) + EPS)


def flatten_state(z: State) -> tuple[Tensor, Any]:
    """(B, ...) tensor or tuple/list of (B, ...) tensors -> ((B, D) tensor, spec to undo it)."""
    if isinstance(z, Tensor):
        flat = z.flatten(1) if z.dim() >= 2 else z.reshape(1, -1)  # flatten: also a batch of 0
        return flat, ("tensor", z.shape)
    parts = list(z)
    shapes = [p.shape for p in parts]
    flat = torch.cat([p.flatten(1) for p in parts], dim=1)
    return flat, (type(z), shapes)


def unflatten_state(flat: Tensor, spec: Any) -> State:
    """Inverse of ``flatten_state``."""
    kind, shapes = spec
    if kind == "tensor":
        return flat.reshape(shapes)
    sizes = [int(torch.Size(s[1:]).numel()) for s in shapes]
    parts = [p.reshape(s) for p, s in zip(torch.split(flat, sizes, dim=1), shapes)]
    return tuple(parts) if kind is tuple else kind(parts)


def damped(f: Callable[[Tensor], Tensor], damping: float) -> Callable[[Tensor], Tensor]:
    """f_d(z) = d z + (1 - d) f(z); the identity wrapper when d == 0."""
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    if damping == 0.0:
        return f
    return lambda z: damping * z + (1.0 - damping) * f(z)


def _new_stats() -> dict:
    return {"residuals": [], "per_sample": [], "iterations": 0, "seconds": 0.0, "converged": False}


def _finish_stats(stats: dict, start: float, tol: float | None) -> dict:
    """Stack per-sample residuals into a (n_iter, B) tensor and record time / convergence."""
    stats["residuals_per_sample"] = torch.stack(stats.pop("per_sample")) if stats["per_sample"] else None
    stats["seconds"] = time.perf_counter() - start
    last = stats["residuals_per_sample"][-1] if stats["residuals_per_sample"] is not None else None
    stats["converged"] = bool(tol is not None and last is not None and bool((last < tol).all()))
    stats["final_residual"] = float(last.max()) if last is not None and last.numel() else float("nan")
    return stats


def _log(stats: dict, res: Tensor) -> None:
    res = res.detach().float().cpu()
    stats["per_sample"].append(res)
    stats["residuals"].append(float(res.mean()))
    stats["iterations"] += 1


# --------------------------------------------------------------------------------------------------
# Solvers (on flat states (B, D); every iteration costs exactly one evaluation of f)
# --------------------------------------------------------------------------------------------------
def picard(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float | None = None,
           stats: dict | None = None) -> Tensor:
    """Fixed-point iteration z_{k+1} = f(z_k); returns f(z_K) for the last iterate z_K.

    Iteration k logs the relative residual of z_k, so ``stats['iterations']`` = number of f calls.
    Stops early once every sample has residual < tol.
    """
    return _iterate(f, z0, max_iter, tol, stats, lambda z, fz: fz)


def _iterate(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float | None, stats: dict | None,
             step: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """z_{k+1} = step(z_k, f(z_k)) with one f call per iteration, logging the relative residual of z_k,
    until every sample is below tol; returns f(z_K) for the last iterate z_K."""
    stats = _new_stats() if stats is None else stats
    start = time.perf_counter()
    z, fz = z0, z0
    for _ in range(max_iter):
        fz = f(z)
        res = relative_residual(z, fz)
        _log(stats, res)
        if tol is not None and bool((res < tol).all()):
            break
        z = step(z, fz)
    _finish_stats(stats, start, tol)
    return fz


def anderson(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float | None = None,
             m: int = 5, lam: float = 1e-6, stats: dict | None = None, reject_factor: float = 2.0) -> Tensor:
    """Anderson acceleration (type II, Walker & Ni 2011, beta = 1) with a per-sample Picard fallback.

    With the last n <= m accepted iterates x_i and images g_i = f(x_i), residuals F_i = g_i - x_i, the
    next iterate is x_{k+1} = sum_i alpha_i g_i with alpha = argmin ||sum_i alpha_i F_i||^2 s.t.
    sum alpha = 1, i.e. alpha ∝ (F F^T + lam * max(diag) I)^{-1} 1 (regularised normal equations, one
    m x m solve per sample). Safeguard, per sample: if an Anderson step increased the relative residual
    by more than ``reject_factor`` (AA residuals are not monotone; 1.0 rejects every increase, which
    measurably slows AA on the Hopfield nets), that iterate is rejected, the sample's history is cleared and it takes the plain Picard step
    x_{k+1} = f(x_ref) from its last accepted iterate x_ref instead (accepted unconditionally); no
    extra f call is needed. Returns f(x_K) for the last iterate x_K; residual logging and early stop
    as in ``picard`` (one f call per iteration). Under grad mode the history is updated out of place,
    so autograd can backpropagate through the iterations (``fixed_point(backward='unroll',
    backward_solver='anderson')``, hopdeq's 'backprop' with solver 'anderson').
    """
    stats = _new_stats() if stats is None else stats
    start = time.perf_counter()
    bsz, dim = z0.shape
    f_hist = z0.new_zeros(bsz, m, dim)  # residuals F_i = g_i - x_i of the accepted iterates
    g_hist = z0.new_zeros(bsz, m, dim)
    valid = torch.zeros(bsz, m, dtype=torch.bool, device=z0.device)
    eye = torch.eye(m, dtype=z0.dtype, device=z0.device)
    x, gx = z0, z0
    ref_g, ref_res = None, None  # image and residual of the last accepted iterate, per sample
    check = torch.zeros(bsz, dtype=torch.bool, device=z0.device)  # was the last step an Anderson step?
    grad = torch.is_grad_enabled()
    for k in range(max_iter):
        gx = f(x)
        res = relative_residual(x, gx)
        _log(stats, res)
        if tol is not None and bool((res < tol).all()):
            break
        reject = check & (res > reject_factor * ref_res) if ref_res is not None else check
        slot = k % m
        if bool(reject.any()):
            accept = ~reject
            ref_g = torch.where(accept[:, None], gx, ref_g)
            ref_res = torch.where(accept, res, ref_res)
            f_hist = _set_slot(f_hist, slot, torch.where(accept[:, None], gx - x, f_hist[:, slot]), grad)
            g_hist = _set_slot(g_hist, slot, torch.where(accept[:, None], gx, g_hist[:, slot]), grad)
            valid[reject] = False
            valid[:, slot] |= accept
            x = torch.where(reject[:, None], ref_g, _anderson_mix(f_hist, g_hist, valid, lam, eye))
            check = accept & (valid.sum(1) > 1)
        else:  # fast path: every sample accepted its step
            ref_g, ref_res = gx, res
            f_hist = _set_slot(f_hist, slot, gx - x, grad)
            g_hist = _set_slot(g_hist, slot, gx, grad)
            valid[:, slot] = True
            x = _anderson_mix(f_hist, g_hist, valid, lam, eye)
            check = valid.sum(1) > 1  # a one-slot mix is a Picard step: always accepted
    _finish_stats(stats, start, tol)
    return gx


def anderson_hopdeq(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float | None = None,
                    m: int = 4, lam: float = 1e-10, stats: dict | None = None) -> Tensor:
    """hopdeq's Anderson acceleration (``deq_core/solvers.py``, Walker & Ni 2011 form 1.1), one f call per
    iteration as in ``anderson``, for comparing the two on the Hopfield nets.

    The first step is Picard, x_1 = g(x_0). Then with the last n <= m iterates x_i (x_0 included) and
    images g_i = g(x_i), F_i = g_i - x_i: alpha ∝ (F F^T + lam I)^{-1} 1 (lam absolute, 1e-10 as in
    hopdeq), x~ = sum_i alpha_i g_i, and the safeguard keeps x~ only where
    ||g(x_k) - x~|| / ||x~|| < ||g(x_k) - x_k|| / ||x_k|| (the last Picard residual), else takes the Picard
    step g(x_k); the history is never cleared. Where the m x m system is numerically singular (which
    hopdeq does not check) the sample takes the Picard step. Returns f(x_K); residual logging and early
    stop as in ``picard``."""
    xs: list[Tensor] = []
    gs: list[Tensor] = []

    def step(x: Tensor, gx: Tensor) -> Tensor:
        xs.append(x)
        gs.append(gx)
        del xs[:-m], gs[:-m]
        return gx if len(xs) < 2 else _hopdeq_step(torch.stack(xs, 1), torch.stack(gs, 1), lam)
    return _iterate(f, z0, max_iter, tol, stats, step)


def _hopdeq_step(x_hist: Tensor, g_hist: Tensor, lam: float) -> Tensor:
    """One safeguarded Anderson step of ``anderson_hopdeq`` from histories (B, n, D), newest last."""
    resid = (g_hist - x_hist).detach()
    gram = resid @ resid.transpose(1, 2)
    gram = gram + lam * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    ones = torch.ones(*gram.shape[:2], 1, dtype=gram.dtype, device=gram.device)
    alpha, info = torch.linalg.solve_ex(gram, ones)
    alpha = (alpha / alpha.sum(dim=1, keepdim=True)).squeeze(-1)
    x_tilde = torch.einsum("bm,bmd->bd", alpha, g_hist)
    g_last, x_last = g_hist[:, -1], x_hist[:, -1]
    with torch.no_grad():
        aa_res = (g_last - x_tilde).norm(dim=-1) / x_tilde.norm(dim=-1).clamp_min(EPS)
        picard_res = (g_last - x_last).norm(dim=-1) / x_last.norm(dim=-1).clamp_min(EPS)
        take = (aa_res < picard_res) & (info == 0) & torch.isfinite(alpha).all(dim=1)
    return torch.where(take[:, None], x_tilde, g_last)


def _set_slot(hist: Tensor, slot: int, value: Tensor, out_of_place: bool) -> Tensor:
    """hist[:, slot] = value, on a copy when autograd needs the old history (grad mode)."""
    if out_of_place:
        hist = hist.clone()
    hist[:, slot] = value
    return hist


def _anderson_mix(f_hist: Tensor, g_hist: Tensor, valid: Tensor, lam: float, eye: Tensor) -> Tensor:
    """x = sum_i alpha_i g_i, alpha = argmin ||F^T alpha|| s.t. 1^T alpha = 1 over valid slots only
    (f_hist holds the residuals F_i = g_i - x_i). The weights alpha are constants for autograd: near
    a fixed point the residuals are rounding noise and d alpha / dF ~ 1 / ||F|| (NaN or garbage), so
    unrolled Anderson steps differentiate x = sum_i alpha_i g_i through the images g_i only."""
    f_hist = f_hist.detach()
    gram = f_hist @ f_hist.transpose(1, 2)                      # (B, m, m)
    vf = valid.to(gram.dtype)
    mask2 = vf.unsqueeze(2) * vf.unsqueeze(1)
    scale = (gram.diagonal(dim1=1, dim2=2) * vf).amax(dim=1).clamp_min(EPS)  # (B,)
    # invalid slots: identity rows and zero right-hand side -> alpha = 0 there
    gram = gram * mask2 + eye * (lam * scale)[:, None, None] + eye * (1.0 - vf).unsqueeze(1)
    alpha, info = torch.linalg.solve_ex(gram, vf.unsqueeze(-1))
    alpha = alpha.squeeze(-1)  # (B, m)
    alpha = alpha / alpha.sum(dim=1, keepdim=True)
    bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
    if bool(bad.any()):  # numerically singular: fall back to the newest valid slot (a Picard step)
        newest = torch.zeros_like(alpha)
        newest[torch.arange(alpha.shape[0]), (vf * torch.arange(1, vf.shape[1] + 1, dtype=vf.dtype)).argmax(1)] = 1.0
        alpha = torch.where(bad[:, None], newest, alpha)
    return torch.einsum("bm,bmd->bd", alpha, g_hist)


def solve(f: Callable[[Tensor], Tensor], z0: Tensor, solver: str = "anderson", max_iter: int = 50,
          tol: float | None = None, m: int = 5, lam: float = 1e-6, stats: dict | None = None) -> Tensor:
    """Dispatch to ``picard``, ``anderson`` or ``anderson_hopdeq`` on a flat (B, D) state (``lam`` applies to
    ``anderson``; ``anderson_hopdeq`` keeps hopdeq's fixed 1e-10)."""
    if solver == "picard":
        return picard(f, z0, max_iter, tol, stats)
    if solver == "anderson":
        return anderson(f, z0, max_iter, tol, m=m, lam=lam, stats=stats)
    if solver == "anderson_hopdeq":
        return anderson_hopdeq(f, z0, max_iter, tol, m=m, stats=stats)
    raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------
def _attach_implicit_grad(f: Callable[[Tensor], Tensor], z_star: Tensor, solver: str, max_iter: int,
                          tol: float | None, m: int, stats: dict) -> Tensor:
    """Return z = f(z*) (one differentiable step) whose incoming gradient v is replaced by the
    solution g of g = J^T g + v, J = df/dz at z*; parameters of f then receive g^T df/dtheta.

    z* itself is treated as a constant; the vector-Jacobian products J^T y are computed by
    ``torch.autograd.grad`` on a separate one-step graph, built lazily in the backward hook.
    """
    z_star = z_star.detach()
    z_out = f(z_star)
    if not z_out.requires_grad:  # nothing to differentiate (e.g. under no_grad)
        return z_out

    def adjoint_hook(grad: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        with torch.enable_grad():
            z_leaf = z_star.clone().requires_grad_(True)
            f_leaf = f(z_leaf)

        def adjoint_map(y: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(f_leaf, z_leaf, y, retain_graph=True)
            return vjp + grad

        backward_stats = _new_stats()
        g = solve(adjoint_map, torch.zeros_like(grad), solver, max_iter, tol, m=m, stats=backward_stats)
        stats["backward"] = backward_stats
        return g

    z_out.register_hook(adjoint_hook)
    return z_out


def _unroll(f: Callable[[Tensor], Tensor], z_star: Tensor, steps: int, solver: str = "picard",
            m: int = 5) -> Tensor:
    """Recurrent backprop: ``steps`` >= 1 iterations of ``solver`` with grad, started at the detached
    z* (picard: z <- f(z); anderson: Anderson steps, differentiated through the mixing as well)."""
    z = z_star.detach()
    if solver == "picard":
        for _ in range(max(1, steps)):
            z = f(z)
        return z
    return solve(f, z, solver, max(1, steps), None, m=m)


# --------------------------------------------------------------------------------------------------
# Functional entry point
# --------------------------------------------------------------------------------------------------
def fixed_point(f: Callable[[Tensor], Tensor], z0: Tensor, solver: str = "anderson", max_iter: int = 50,
                tol: float | None = 1e-5, backward: str = "implicit", backward_iter: int = 30,
                backward_tol: float | None = 1e-8, backward_solver: str | None = None,
                damping: float = 0.0, m: int = 5) -> tuple[Tensor, dict]:
    """Differentiable fixed point z* = f_d(z*) of f_d(z) = damping * z + (1 - damping) * f(z).

    Args:
        f: map Tensor -> Tensor of the shape of z0; may capture parameters / inputs in its closure,
            which receive gradients. It is called without grad during the solve.
        z0: initial state; dim 0 is the batch (residuals, early stop are per sample; a 1-d z0 is one
            sample). z0 receives no gradient (the fixed point does not depend on it).
        solver: 'picard', 'anderson' (memory m) or 'anderson_hopdeq' (hopdeq's variant, memory m).
        max_iter, tol: forward budget; stop once every sample has ||f_d(z) - z|| / ||f_d(z)|| < tol
            (tol=None: always run max_iter iterations).
        backward: 'implicit' -> returned z* = f_d(z*) carries a hook that solves the adjoint fixed point
            g = J^T g + v (J = df_d/dz at z*) with ``backward_solver`` (default: ``solver``) for up to
            ``backward_iter`` iterations / ``backward_tol``; 'unroll' -> backprop through
            ``backward_iter`` iterations of ``backward_solver`` (default: Picard steps z <- f_d(z), a
            truncated Neumann series of the implicit gradient; 'anderson': Anderson steps) started at
            the detached fixed point. Without grad mode both just return z*.
        damping: d in [0, 1).
    Returns:
        (z_star, stats) with z_star of z0's shape and stats = dict(residuals: list[float] mean relative
        residual per forward iteration, residuals_per_sample: Tensor (iterations, B), iterations: int
        (= number of f calls), seconds: float, converged: bool, final_residual: float (max over batch));
        after an implicit backward pass, stats['backward'] holds the same keys for the adjoint solve.
    """
    if backward not in ("implicit", "unroll"):
        raise ValueError(f"backward must be 'implicit' or 'unroll', got {backward!r}")
    for name, value in (("solver", solver), ("backward_solver", backward_solver or solver)):
        if value not in SOLVERS:
            raise ValueError(f"unknown {name} {value!r}; choose from {SOLVERS}")
    flat0, spec = flatten_state(z0)

    def f_undamped(zf: Tensor) -> Tensor:
        return flatten_state(f(unflatten_state(zf, spec)))[0]

    f_flat = damped(f_undamped, damping)

    stats = _new_stats()
    with torch.no_grad():
        z_star = solve(f_flat, flat0.detach(), solver, max_iter, tol, m=m, stats=stats)
    if torch.is_grad_enabled():
        if backward == "implicit":
            z_star = _attach_implicit_grad(f_flat, z_star, backward_solver or solver, backward_iter,
                                           backward_tol, m, stats)
        else:
            z_star = _unroll(f_flat, z_star, backward_iter, backward_solver or "picard", m)
    return unflatten_state(z_star, spec), stats


# --------------------------------------------------------------------------------------------------
# Module (hopdeq protocol)
# --------------------------------------------------------------------------------------------------
class DEQ(nn.Module):
    """Deep equilibrium layer x -> z* = f_d(Ux, z*), Ux = f_module.preprocess_inputs(x).

    Args:
        f_module: nn.Module with ``preprocess_inputs(x) -> Ux`` and ``forward(Ux, z) -> new z``; z may
            be a tensor (B, ...) or a tuple/list of per-layer tensors (flattened internally).
        z_init: initial state (batch dim may be 1 and is then broadcast to the input's batch size), or
            None when every call passes its own ``z_init``.
        forward_kwargs: dict(solver='anderson'|'picard'|'anderson_hopdeq', iter=40, tol=None, m=5).
        backward_kwargs: dict(solver='picard'|'anderson', iter=8, method='backprop'|'full_adjoint',
            tol=None). 'backprop' (as in hopdeq): backpropagation through ``iter`` iterations of
            ``solver`` on the damped map, started at the detached z* (Picard steps, or Anderson steps
            differentiated through their mixing: hopdeq's default {"solver": "anderson", "iter": 8,
            "method": "backprop"} runs unchanged); 'full_adjoint': implicit differentiation, the
            adjoint fixed point g = J^T g + v solved by ``solver`` for ``iter`` iterations.
        damping_factor: d in f_d(z) = d z + (1 - d) f(Ux, z).
    After each call ``last_stats`` holds the forward solver's stats (see ``fixed_point``).
    """

    def __init__(self, f_module: nn.Module, z_init: State, forward_kwargs: dict | None = None,
                 backward_kwargs: dict | None = None, damping_factor: float = 0.0) -> None:
        super().__init__()
        self.f_module = f_module
        self.z_init = z_init
        self.forward_kwargs = {"solver": "anderson", "iter": 40, "tol": None, "m": 5,
                               **(forward_kwargs or {})}
        self.backward_kwargs = {"solver": "picard", "iter": 8, "method": "backprop", "tol": None,
                                **(backward_kwargs or {})}
        if self.backward_kwargs["method"] not in ("backprop", "full_adjoint"):
            raise ValueError(f"unknown backward method {self.backward_kwargs['method']!r}")
        for kind, kw in (("forward", self.forward_kwargs), ("backward", self.backward_kwargs)):
            if kw["solver"] not in SOLVERS:
                raise ValueError(f"unknown {kind} solver {kw['solver']!r}; choose from {SOLVERS}")
        damped(lambda z: z, damping_factor)  # validates the range
        self.damping_factor = damping_factor
        self.last_stats: dict = {}

    def _initial_state(self, batch_size: int) -> State:
        if self.z_init is None:
            raise ValueError("DEQ was built with z_init=None: pass z_init to forward()")
        def expand(t: Tensor) -> Tensor:
            return t.expand(batch_size, *t.shape[1:]) if t.shape[0] == 1 else t
        if isinstance(self.z_init, Tensor):
            return expand(self.z_init)
        return type(self.z_init)(expand(t) for t in self.z_init)

    def forward(self, x: Tensor, z_init: State | None = None) -> State:
        """Return z* for inputs x (differentiable w.r.t. x and f_module's parameters)."""
        ux = self.f_module.preprocess_inputs(x)
        z0 = self._initial_state(x.shape[0]) if z_init is None else z_init
        fk, bk = self.forward_kwargs, self.backward_kwargs
        implicit = bk["method"] == "full_adjoint"
        z_star, stats = fixed_point(
            lambda z: self.f_module(ux, z), z0, solver=fk["solver"], max_iter=fk["iter"], tol=fk["tol"],
            backward="implicit" if implicit else "unroll", backward_iter=bk["iter"],
            backward_tol=bk["tol"], backward_solver=bk["solver"], damping=self.damping_factor, m=fk["m"])
        self.last_stats = stats
        return z_star
