"""Sparse and structured normalization maps  y_Omega(theta) = argmax_{y in M} <theta, y> - Omega(y).

Every map normalizes along ``dim`` and returns weights on the probability simplex (sum 1), so any of
them can replace ``torch.softmax`` in an attention / Hopfield update.  Masked entries (``-inf``) get
weight exactly 0, and a row that is entirely masked returns zeros (never NaN).

INTERIM VERSION (lead): thin wrappers over the ``entmax`` package; the maps helper replaces internals.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor
import entmax as _entmax

MODES = ("softmax", "sparsemax", "entmax", "entmax_alpha", "gsh", "normmax", "k_subsets",
         "sequential_k_subsets")

_MASK_GAP = 1e4  # masked scores are put this far below the row max: weight exactly 0 for every map


def _with_mask(fn: Callable[[Tensor], Tensor], x: Tensor, dim: int) -> Tensor:
    """Apply ``fn`` (normalizing over the last dim) to ``x`` with -inf entries given weight 0."""
    x = x.movedim(dim, -1)
    masked = torch.isneginf(x)
    if not masked.any():
        return fn(x).movedim(-1, dim)
    empty = masked.all(dim=-1, keepdim=True)
    finite = x.masked_fill(masked, float("inf")).amin(-1, keepdim=True)
    stand_in = torch.where(empty, torch.zeros_like(finite), finite - _MASK_GAP)
    x = torch.where(masked, stand_in.expand_as(x), x)
    x = torch.where(empty, torch.zeros_like(x), x)
    y = fn(x).masked_fill(masked | empty, 0.0)
    return y.movedim(-1, dim)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """y_i = exp(x_i) / sum_j exp(x_j)  (Omega = negative Shannon entropy)."""
    return _with_mask(lambda z: torch.softmax(z, dim=-1), x, dim)


def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    """y = argmin_{y in simplex} ||y - x||^2 = [x - tau]_+  (Martins & Astudillo, 2016)."""
    return _with_mask(lambda z: _entmax.sparsemax(z, dim=-1), x, dim)


def entmax15(x: Tensor, dim: int = -1) -> Tensor:
    """1.5-entmax: y = [x/2 - tau]_+^2  (Peters et al., 2019)."""
    return _with_mask(lambda z: _entmax.entmax15(z, dim=-1), x, dim)


def entmax(x: Tensor, alpha: float | Tensor = 1.5, dim: int = -1) -> Tensor:
    """alpha-entmax: y = [(alpha-1) x - tau]_+^{1/(alpha-1)}; alpha=1 softmax, alpha=2 sparsemax."""
    if isinstance(alpha, (int, float)) and alpha == 1:
        return softmax(x, dim)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(x.dtype).movedim(dim, -1) if alpha.dim() == x.dim() else alpha.to(x.dtype)
    return _with_mask(lambda z: _entmax.entmax_bisect(z, alpha, dim=-1), x, dim)


def normmax(x: Tensor, alpha: float = 2.0, dim: int = -1) -> Tensor:
    """alpha-normmax: Omega(y) = ||y||_alpha - 1 on the simplex (Santos et al., 2024)."""
    return _with_mask(lambda z: _entmax.normmax_bisect(z, alpha, dim=-1), x, dim)


def k_subsets(x: Tensor, k: int = 2, dim: int = -1) -> Tensor:
    """SparseMAP over k-subsets: marginals mu = argmin_{0<=mu<=1, sum mu=k} ||mu - x||^2, returned / k."""
    return _with_mask(lambda z: _entmax.budget_bisect(z, k, dim=-1) / k, x, dim)


def sequential_k_subsets(x: Tensor, k: int = 2, dim: int = -1, **kwargs) -> Tensor:
    """SparseMAP over k-subsets with a chain (consecutive-pair) reward. Implemented by the maps helper."""
    raise NotImplementedError("sequential_k_subsets is being implemented")


def get_map(mode: str, **params) -> Callable[[Tensor], Tensor]:
    """Return ``f(x)`` normalizing over the last dim for a mode name (see ``MODES``)."""
    if mode == "softmax":
        return partial(softmax, dim=-1)
    if mode == "sparsemax":
        return partial(sparsemax, dim=-1)
    if mode == "entmax":
        return partial(entmax15, dim=-1)
    if mode in ("entmax_alpha", "gsh"):
        return partial(entmax, alpha=params.get("alpha", 1.5), dim=-1)
    if mode == "normmax":
        return partial(normmax, alpha=params.get("alpha", 2.0), dim=-1)
    if mode == "k_subsets":
        return partial(k_subsets, k=params.get("k", 2), dim=-1)
    if mode == "sequential_k_subsets":
        return partial(sequential_k_subsets, k=params.get("k", 2), dim=-1)
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
