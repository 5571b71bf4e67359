"""Sparse and structured normalization maps  y_Omega(theta) = argmax_{y in M} <theta, y> - Omega(y).

Every map normalizes along ``dim`` (batched over all other dims) and returns weights on the probability
simplex (sum 1), so any of them can replace ``torch.softmax`` in an attention / Hopfield update.

Conventions shared by all maps
  * Masked entries (``-inf``) get weight exactly 0; a row that is entirely masked returns zeros (never
    NaN) and zero gradient. A row holding a NaN returns NaN (every entry) and NaN gradients, on every
    map and path; ``+inf`` is not supported. Empty inputs give empty outputs.
  * Bad arguments fail before any work: non-float scores (int / bool), alpha not finite or out of
    range, k not an integer in [1, n], a parameter name a mode does not take (``get_map``).
  * Shift invariant: every solver works on the scores minus their row max (exact for the entries that
    set the threshold), so offsets of 1e20 cost no precision; k-subsets re-centres on its
    ceil(k)-th largest entry when its root lies far below the max (exact at 1e30 magnitudes).
  * float16, bfloat16, float32 and float64 (e.g. under ``torch.autocast``), CPU and CUDA; outputs
    and gradients in the input's dtype, 16-bit rows solved in float32 (kernels) or float64 (torch
    solvers). On CPU the threshold maps run compiled numba kernels
    (sparsemax_kernels.py: the same exact solvers, row by row, one loop instead of a dozen eager ops
    per iteration; float32 rows in float32 on max-shifted scores there, and k-subsets brackets its
    root by its own Newton iterates; ``CPU_KERNELS = False`` switches them off); CUDA tensors (and CPU
    without numba) run the torch solvers described next. Sequential k-subsets always runs its numba
    solver on the host (its oracle is a sequential dynamic program; CUDA tensors are copied).
  * Exact solutions; the torch solvers compute in float64 internally (also for float32 inputs); the
    pow-based maps give weight 0 to an entry within the rounding of the root of the boundary (its exact
    weight, up to slack^(1/(alpha-1)), is not determined in float64). Each
    map is a 1-d problem in a threshold tau (or, for sequential k-subsets, a small QP), solved
    without sorting:
      - sparsemax, k-subsets: Newton steps that land on the root of the current linear piece
        (Michelot-type, finite exact termination);
      - 1.5-entmax, 2-normmax: support-based closed form (a quadratic; Newton on F^(1/2) where it has
        no real root), stopped when a closed-form point keeps the support it came from (exact);
      - alpha-entmax, alpha-normmax: safeguarded Newton on ||[z - tau]_+||_p (convex for p >= 1),
        stopped at |F(tau) - 1| within the rounding of F or when no representable progress is left.
    Every tau iterate stays above a lower bound: max - 1 for the simplex maps, raised (rows >= 64) to
    the root of the same equation over the maxima of 16 column blocks (a subset of the entries, so
    its root is <= tau). The entries below the bound are dropped once: the candidates are packed
    left into a small dense (rows, L) tensor (padded with -inf) found by scanning only the blocks
    whose max exceeds the bound, and later steps cost O(rows * L); outputs and backward passes are
    computed on the support only (gather / scatter_add).
    bench/bench_maps.py times every map against torch.softmax and the ``entmax`` package.
  * sequential_k_subsets: active-set SparseMAP with a budgeted-Viterbi MAP oracle (exact;
    sparsemax_kernels.py, with a ray step where the active structures are affinely dependent).
  * Gradients are closed-form custom backward passes (Martins & Astudillo 2016; Peters et al. 2019;
    Correia et al. 2019 for the alpha gradient; Santos et al. 2024 for normmax; Niculae et al. 2018
    for SparseMAP), all checked with ``torch.autograd.gradcheck`` in tests/test_sparsemax.py.

SparseMAP maps (k_subsets, sequential_k_subsets) return the unary marginals mu of the structures,
which lie in [0, 1]^n and sum to k. By default (``normalize=True``, the contract of this project) they
are returned divided by k so that, like every other map, the weights sum to 1 and q <- X^T y stays a
convex combination of patterns. The reference code of Santos et al. (2024), github.com/deep-spin/SSHN,
uses the *unscaled* marginals (sum k) as pattern weights: ``scripts/utils.py`` (HopfieldNet._run:
``Q = X.T @ p`` with ``p = SparseMAP_exactly_k(...)``) and ``scripts/hflayers/functional.py``
(``xi = budget_bisect(...)``, then ``bmm(xi, v)``). Pass ``normalize=False`` to reproduce that.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor

try:  # numba CPU kernels of the threshold maps; without numba the torch code below runs everywhere
    import sparsemax_kernels as _K
except ImportError:  # pragma: no cover - numba is in requirements.txt
    _K = None

MODES = ("softmax", "sparsemax", "entmax", "entmax_alpha", "gsh", "normmax", "k_subsets",
         "sequential_k_subsets")

# Default score for each pair of consecutive selected items in sequential_k_subsets. Santos et al.'s
# code (deep-spin/SSHN, scripts/utils.py, HopfieldNet._run) calls
# SparseMAP_sequence_exactly_k(beta * X q, 100, k), i.e. a transition score of 100.
SEQUENTIAL_TRANSITION_DEFAULT = 100.0

_MAX_NEWTON = 100


# --------------------------------------------------------------------------------------------------
# Argument checks (before any work) and helpers: normalized dim last, masked / NaN rows
# --------------------------------------------------------------------------------------------------
def _check_scores(x: Tensor, name: str) -> None:
    """x must be a floating-point tensor (int / bool scores have no simplex weights in their dtype)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: x must be a floating-point tensor (float16, bfloat16, float32, float64), "
                        f"got {x.dtype}; convert it, e.g. x.float()")


def _check_alpha(alpha: float, name: str, strict: bool) -> float:
    """A finite float alpha >= 1 (strict: > 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: alpha must be a float (or a tensor for entmax), got {type(alpha).__name__}")
    alpha = float(alpha)
    ok = math.isfinite(alpha) and (alpha > 1 if strict else alpha >= 1)
    if not ok:
        raise ValueError(f"{name}: alpha must be {'>' if strict else '>='} 1 and finite, got {alpha}")
    return alpha


def _check_k(k, name: str, n: int | None = None) -> int:
    """k: an integer in [1, n] (n = the size of the normalized dim; None: not known yet; 0: empty input)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name}: k must be a positive integer (the size of the selected subsets), "
                        f"got {k!r} ({type(k).__name__})")
    k = int(k)
    if k < 1:
        raise ValueError(f"{name}: k must be a positive integer, got {k}")
    if n and k > n:
        raise ValueError(f"{name}: k={k} exceeds the {n} entries along the normalized dim (k <= n)")
    return k


def _check_normalize(normalize, name: str) -> bool:
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"{name}: normalize must be True or False, got {normalize!r}")
    return bool(normalize)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 rows are solved (and differentiated) in float32, others in their dtype."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _rows_and_max(x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(x with fully masked and NaN rows set to 0, row max (0 there), mask of those rows or None,
    mask of the NaN rows or None). amax propagates NaN, so the NaN rows cost no extra pass."""
    m = x.amax(-1, keepdim=True)
    special = torch.isneginf(m) | torch.isnan(m)
    if bool(special.any()):
        nan = torch.isnan(m)
        x = x.masked_fill(special, 0.0)
        m = m.masked_fill(special, 0.0)
        return x, m, special, nan if bool(nan.any()) else None
    return x, m, None, None


def _nan_rows(y: Tensor) -> Tensor | None:
    """Mask (B, 1) of the rows of a kernel's (CPU) output that are NaN (a NaN row is NaN in every
    entry), or None; in numpy (a few microseconds per call)."""
    nan = np.isnan(y.numpy()[:, :1])
    return torch.from_numpy(nan) if nan.any() else None


def _with_nan(t: Tensor, nan: Tensor | None) -> Tensor:
    """t with the rows of ``nan`` set to NaN (NaN in -> NaN out, also for gradients)."""
    return t if nan is None else t.masked_fill(nan, float("nan"))


# CPU tensors go through the compiled kernels of sparsemax_kernels.py (the same exact solvers, one pass
# per row instead of a dozen eager ops per iteration; float32 rows in float32 arithmetic there, in
# float64 here); set to False to run the torch code on CPU as well (tests compare the two paths).
CPU_KERNELS = _K is not None


def _on_kernels(x: Tensor) -> bool:
    """Run this (B, n) tensor through the numba kernels? (float16 / bfloat16 rows: in float32.)"""
    return CPU_KERNELS and x.is_cpu and x.dtype.is_floating_point


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _kernel_out(x: Tensor, kernel: Callable, *args) -> Tensor:
    """out = empty like x; kernel(x, out, *args) on numpy views (16-bit x: on a float32 copy);
    returns out as a tensor (float32 for 16-bit x)."""
    xn = _np(x if x.dtype in (torch.float32, torch.float64) else x.float())
    out = np.empty_like(xn)
    kernel(xn, out, *args)
    return torch.from_numpy(out)


def _kernel_vjp(y: Tensor, g: Tensor, kernel: Callable, *args) -> Tensor:
    """dx = empty like y; kernel(y, g, dx, *args) (the backward kernels); returns dx as a tensor."""
    yn = _np(y)
    dx = np.empty_like(yn)
    kernel(yn, _np(g.to(y.dtype)), dx, *args)
    return torch.from_numpy(dx)


def _apply_last(fn: Callable[[Tensor], Tensor], x: Tensor, dim: int) -> Tensor:
    """Apply fn (normalizing the last dim of a 2-d tensor) along ``dim`` of x; empty x -> empty output."""
    if x.numel() == 0:
        x.movedim(dim, -1)  # validates dim
        return x * 0  # same shape and dtype, still attached to autograd
    if dim == -1 or dim == x.dim() - 1:  # no movedim (and no reshape for 2-d x): fewer autograd nodes
        return fn(x) if x.dim() == 2 else fn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    xl = x.movedim(dim, -1)
    return fn(xl.reshape(-1, xl.shape[-1])).reshape(xl.shape).movedim(-1, dim)


def _shifted(z: Tensor, shift: Tensor, scale: float | Tensor) -> Tensor:
    """(z - shift) * scale in float64 (shift (B, 1) float64: the row max, or for k-subsets possibly its
    ceil(k)-th largest entry). The subtraction is exact for the entries within a factor 2 of the
    shift, i.e. the ones near the root, at any offset."""
    z = z.double() - shift
    return z * scale if isinstance(scale, Tensor) or scale != 1.0 else z


class _DenseRows:
    """Row reductions over the last dim of a (B, n) tensor, held shifted in float64: (z - shift) * scale."""

    def __init__(self, z: Tensor, scale: float | Tensor, shift: Tensor):
        self.z = _shifted(z, shift, scale)

    def sum(self, v: Tensor) -> Tensor:
        return v.sum(-1, keepdim=True)

    def bc(self, t):
        return t

    def shrink(self, lo: Tensor, n_above: Tensor | None = None) -> None:
        """Entries <= lo can be dropped (no-op for the dense layout)."""

    def support(self, tau: Tensor, empty: Tensor | None):
        """(support container, r = [z - tau]_+ in float64 on it)."""
        r = (self.z - tau).clamp_min_(0.0)
        if empty is not None:
            r.masked_fill_(empty, 0.0)
        return _DenseSupport(), r


class _DenseSupport:
    """Values stored densely: (B, n)."""

    def sum(self, v: Tensor) -> Tensor:
        return v.sum(-1, keepdim=True)

    def bc(self, t):
        return t

    def take(self, g: Tensor) -> Tensor:
        return g

    def dense(self, v: Tensor) -> Tensor:
        return v


class _PackedSupport:
    """Values stored at (row, cols[row, j]) of a (B, n) output, packed left in a (B, L) tensor.

    Padding slots hold the value 0 (and column 0): they add nothing to sums nor to the dense output
    (scatter_add), and every backward formula gives them 0."""

    def __init__(self, cols: Tensor, n: int):
        self.cols, self.n = cols, n

    def sum(self, v: Tensor) -> Tensor:
        return v.sum(-1, keepdim=True)

    def bc(self, t):
        return t

    def take(self, g: Tensor) -> Tensor:
        return g.gather(1, self.cols)

    def dense(self, v: Tensor) -> Tensor:
        out = torch.zeros(v.shape[0], self.n, dtype=v.dtype, device=v.device)
        return out.scatter_add_(1, self.cols, v)


def _pack_rows(values: Tensor, cols: Tensor | None, flat: Tensor, fill: float) -> tuple[Tensor, Tensor]:
    """Pack the entries of values (B, L0) at the flat indices ``flat`` (increasing) to the left of a
    (B, L) tensor, L = max kept per row; other slots get ``fill`` (column 0). cols (B, L0) are the
    entries' columns (None: their position). Returns (packed values, packed columns)."""
    B, L0 = values.shape
    rows = torch.div(flat, L0, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=B)
    L = max(int(counts.max()), 1) if B > 0 else 1
    start = counts.cumsum(0) - counts
    dst = rows * L + (torch.arange(flat.numel(), device=flat.device) - start[rows])
    out_v = torch.full((B * L,), fill, dtype=values.dtype, device=values.device)
    out_v[dst] = values.reshape(-1)[flat]
    out_c = torch.zeros(B * L, dtype=torch.long, device=values.device)
    out_c[dst] = (flat - rows * L0) if cols is None else cols.reshape(-1)[flat]
    return out_v.view(B, L), out_c.view(B, L)


class _CompactRows:
    """The entries of a (B, n) tensor above a per-row lower bound of tau, packed left into a dense
    (B, L) float64 tensor (L = the largest count), padded with -inf (which every solver treats as a
    masked entry).

    Every iterate of the threshold solvers is >= that bound, so the other entries never enter a sum:
    iterating on the candidates only costs O(B L) per step instead of O(B n), with plain dense row
    reductions."""

    def __init__(self, z: Tensor, flat: Tensor | None, scale: float | Tensor, shift: Tensor,
                 packed: tuple[Tensor, Tensor] | None = None):
        """flat: flat indices of the candidates in z, or packed = (values, columns) already; the values
        are held as (z - shift) * scale in float64."""
        self.B, self.n = z.shape
        self.z, self.cols = packed if packed is not None else _pack_rows(z, None, flat, float("-inf"))
        self.z = _shifted(self.z, shift, scale)

    def shrink(self, lo: Tensor, n_above: Tensor | None = None) -> None:
        """Drop the candidates <= lo (a new lower bound of tau) once the widest row would halve.

        n_above: per-row counts of candidates above some point >= lo (a cheap lower estimate of the
        number kept, used to skip the work when little would be dropped)."""
        L = self.z.shape[1]
        if L < 8 or (n_above is not None and float(n_above.max()) > L // 2):
            return
        keep = self.z > lo
        if int(keep.sum(-1).max()) <= L // 2:
            flat = keep.reshape(-1).nonzero().squeeze(1)
            self.z, self.cols = _pack_rows(self.z, self.cols, flat, float("-inf"))

    def support(self, tau: Tensor, empty: Tensor | None):
        r = (self.z - tau).clamp_min_(0.0)
        if empty is not None:
            r.masked_fill_(empty, 0.0)
        return _PackedSupport(self.cols, self.n), r

    def sum(self, v: Tensor) -> Tensor:
        return v.sum(-1, keepdim=True)

    def bc(self, t):
        return t


_COMPACT_MIN_SIZE = 1 << 15  # below this many entries the dense loop is cheaper
_COMPACT_MAX_FRACTION = 0.25


def _rows_for(z: Tensor, lo: Tensor, scale: float | Tensor, shift: Tensor, bm: Tensor | None = None):
    """Rows of (z - shift) * scale (float64) as a packed list of the entries above lo when that is
    much smaller than z (scale > 0, a float or a per-row (B, 1) tensor), else densely.

    bm: block maxima of z (see _block_max): only the blocks whose max is above lo are scanned."""
    if z.numel() < _COMPACT_MIN_SIZE:
        return _DenseRows(z, scale, shift)
    z2 = z.reshape(-1, z.shape[-1])
    thr = lo.reshape(-1, 1) / scale if isinstance(scale, Tensor) or scale != 1.0 else lo.reshape(-1, 1)
    thr = thr + shift.reshape(-1, 1)  # in z's coordinates; compared in z's dtype, lowered by a few ulps
    thr = (thr - (thr.abs() + 1.0) * (8 * torch.finfo(z.dtype).eps)).to(z.dtype)
    if bm is not None:
        packed = _candidates_in_blocks(z2, thr, bm)
        if packed is not None:
            return _CompactRows(z2, None, scale, shift, packed)
    flat = (z2 > thr).reshape(-1).nonzero().squeeze(1)
    if flat.numel() > _COMPACT_MAX_FRACTION * z.numel():
        return _DenseRows(z, scale, shift)
    return _CompactRows(z2, flat, scale, shift)


def _candidates_in_blocks(z: Tensor, thr: Tensor, bm: Tensor) -> tuple[Tensor, Tensor] | None:
    """Entries z > thr (B, n; thr (B, 1)) packed left into (B, L) (values padded with -inf, columns),
    scanning only the blocks of _block_max whose max exceeds thr; None when those blocks hold more
    than _COMPACT_MAX_FRACTION of z (then a full scan decides)."""
    B, n = z.shape
    nb = bm.shape[1]
    bs = n // nb
    h = bs * (nb - 1)
    w = n - h  # width of the last block
    sel = bm > thr
    fa = sel[:, :-1].reshape(-1).nonzero().squeeze(1)  # selected regular blocks, row-major
    rb = sel[:, -1].nonzero().squeeze(1)  # rows whose last block is selected
    if fa.numel() * bs + rb.numel() * w > _COMPACT_MAX_FRACTION * z.numel():
        return None
    ra, ba = torch.div(fa, nb - 1, rounding_mode="floor"), fa % (nb - 1)
    za = z[:, :h].unflatten(1, (nb - 1, bs))[ra, ba]  # (Na, bs)
    ea = (za > thr[ra]).reshape(-1).nonzero().squeeze(1)
    blk_a = torch.div(ea, bs, rounding_mode="floor")
    row_a, col_a, val_a = ra[blk_a], ba[blk_a] * bs + ea % bs, za.reshape(-1)[ea]
    zb = z[rb, h:]  # (Nb, w)
    eb = (zb > thr[rb]).reshape(-1).nonzero().squeeze(1)
    blk_b = torch.div(eb, w, rounding_mode="floor")
    row_b, col_b, val_b = rb[blk_b], h + eb % w, zb.reshape(-1)[eb]
    # both lists are grouped by row (increasing); slot of an entry = its rank within its row
    cnt_a = torch.bincount(row_a, minlength=B)
    cnt_b = torch.bincount(row_b, minlength=B)
    L = max(int((cnt_a + cnt_b).max()), 1) if B > 0 else 1
    pos_a = torch.arange(row_a.numel(), device=z.device) - (cnt_a.cumsum(0) - cnt_a)[row_a]
    pos_b = cnt_a[row_b] + torch.arange(row_b.numel(), device=z.device) - (cnt_b.cumsum(0) - cnt_b)[row_b]
    dst = torch.cat([row_a * L + pos_a, row_b * L + pos_b])
    vals = torch.full((B * L,), float("-inf"), dtype=torch.float64, device=z.device)
    vals[dst] = torch.cat([val_a, val_b]).double()
    cols = torch.zeros(B * L, dtype=torch.long, device=z.device)
    cols[dst] = torch.cat([col_a, col_b])
    return vals.view(B, L), cols.view(B, L)


# --------------------------------------------------------------------------------------------------
# Threshold solvers (no autograd inside): all work on the last dim, rows with finite max
# --------------------------------------------------------------------------------------------------
_BLOCKS = 16  # the maxima of this many column blocks give a lower bound of tau (see _subset_bound)
_MIN_BLOCK = 4  # shorter blocks give too weak a bound


def _block_max(z: Tensor) -> Tensor | None:
    """Maxima (B, _BLOCKS) of _BLOCKS column blocks of z (B, n): n // _BLOCKS columns each, the last
    block also holding the n % _BLOCKS tail columns. None for short rows (the dense loop is used)."""
    B, n = z.shape
    bs = n // _BLOCKS
    if bs < _MIN_BLOCK or z.numel() < _COMPACT_MIN_SIZE:
        return None
    h = bs * (_BLOCKS - 1)
    return torch.cat([z[:, :h].unflatten(1, (_BLOCKS - 1, bs)).amax(-1), z[:, h:].amax(-1, keepdim=True)], 1)


def _subset_bound(z: Tensor, solve: Callable[[Tensor, Tensor], Tensor], need: int = 1):
    """(lower bound of a threshold tau from a subset of each row's entries, block maxima), or
    (None, None) for short rows.

    All the threshold equations here read F(tau) = sum_i f(z_i - tau) = c with f >= 0 nondecreasing,
    so F_sub <= F for the sum over any subset of the entries and the root of F_sub = c is <= tau
    (F decreasing). The subset: the maxima of _BLOCKS column blocks (distinct entries), solved
    densely by ``solve(sub, sub_max)``; rows whose blocks hold fewer than ``need`` finite entries get
    -inf. The bound is lowered by a relative 1e-12 against rounding, so that F(bound) >= c safely.
    The block maxima also tell which blocks can hold candidates (see _rows_for).
    """
    bm = _block_max(z) if need <= _BLOCKS else None
    if bm is None:
        return None, None
    sub = bm.double()
    bad = torch.isfinite(sub).sum(-1, keepdim=True) < need
    sub = sub.masked_fill(bad, 0.0)
    lb = solve(sub, sub.amax(-1, keepdim=True))
    lb = lb - (lb.abs() + 1.0) * 1e-12
    return lb.masked_fill(bad, float("-inf")), bm


def _sparsemax_tau(z: Tensor, m: Tensor, dense: bool = False):
    """tau with sum_i [z_i - m - tau]_+ = 1, m the row max: the threshold of the shifted scores z - m
    (as every solver here: exact at any offset). Michelot's algorithm = Newton from a lower bound:
    tau_0 = max(-1, subset bound).

    tau_{t+1} = (sum_{i in S_t} z_i - 1) / |S_t| with S_t = {z_i > tau_t}; S_t shrinks monotonically
    and tau_t is exact as soon as |S_{t+1}| = |S_t| (finite termination).
    """
    m = m.double()
    tau = torch.full_like(m, -1.0)
    lb, bm = (None, None) if dense else _subset_bound(z, lambda s, sm: _sparsemax_tau(s, sm, dense=True)[0])
    if lb is not None:
        tau = torch.maximum(tau, lb)
    R = _DenseRows(z, 1.0, m) if dense else _rows_for(z, tau, 1.0, m, bm)
    cnt_prev = None
    for _ in range(z.shape[-1] + 2):
        r = (R.z - R.bc(tau)).clamp_min_(0.0)
        cnt = R.sum(torch.sign(r)).clamp_min_(1.0)
        tau = tau + (R.sum(r) - 1.0) / cnt
        if cnt_prev is not None and torch.equal(cnt, cnt_prev):
            break
        cnt_prev = cnt
        R.shrink(tau, cnt)
    return tau, R


def _quadratic_tau(z: Tensor, m: Tensor, scale: float = 1.0, dense: bool = False):
    """tau with sum_i [scale (z_i - m) - tau]_+^2 = 1, m the row max (1.5-entmax: scale 1/2; 2-normmax: 1).

    Safeguarded iteration on F(tau) = sum [z - tau]_+^2, convex and decreasing. From any point t the
    next one is the smaller root of sum_{i in S(t)} (z_i - t')^2 = 1: from a lower bound (F(t) >= 1,
    S(t) contains the optimal support) it is an upper bound or exact, from an upper bound (S(t) inside
    the optimal support) a lower bound or exact. Where that quadratic has no real root (S(t) far too
    large) a Newton step on G = F^(1/2) (convex: lands below the root) is taken instead. A closed-form
    point whose support equals the one it was computed from is the exact solution, which ends the
    iteration (finite termination in practice; capped).
    """
    m = m.double()
    lo = torch.full_like(m, -1.0)  # tau for scale * (z - m)
    lb, bm = (None, None) if dense else _subset_bound(z, lambda s, sm: _quadratic_tau(s, sm, scale, dense=True)[0])
    if lb is not None:
        lo = torch.maximum(lo, lb)
    t = lo
    R = _DenseRows(z, scale, m) if dense else _rows_for(z, lo, scale, m, bm)
    from_closed = torch.zeros_like(lo, dtype=torch.bool)
    cnt_src = torch.zeros_like(lo)
    done = torch.zeros_like(lo, dtype=torch.bool)
    for _ in range(_MAX_NEWTON):
        r = (R.z - R.bc(t)).clamp_min(0.0)
        cnt = R.sum(torch.sign(r))
        r1 = R.sum(r)
        r2 = R.sum(r * r)
        done = done | (from_closed & (cnt == cnt_src))
        if bool(done.all()):
            break
        is_lower = r2 >= 1.0
        lo = torch.where(is_lower, torch.maximum(lo, t), lo)
        cnt_safe = cnt.clamp_min(1.0)
        disc = r1 * r1 - cnt_safe * (r2 - 1.0)
        closed = t + (r1 - disc.clamp_min(0.0).sqrt()) / cnt_safe
        g = r2.sqrt()
        newton = t + (g - 1.0) * g / r1.clamp_min(torch.finfo(torch.float64).tiny)  # Newton on F^(1/2)
        use_closed = disc >= 0
        nxt = torch.where(use_closed, closed, torch.maximum(newton, lo))
        # a point that cannot move any more is converged as well
        stuck = nxt == t
        done = done | stuck
        nxt = torch.where(done, t, nxt)
        from_closed = use_closed & ~done
        cnt_src = cnt
        t = nxt
        R.shrink(lo)
    return t, R


def _power_tau(z: Tensor, m: Tensor, p: Tensor | float, scale: float | Tensor = 1.0, dense: bool = False):
    """tau with F(tau) = sum_i [scale (z_i - m) - tau]_+^p = 1, p > 0 (scalar or per row), m the row max.

    Newton on G(tau) = F(tau)^{1/p} = ||[z - tau]_+||_p, which is convex and decreasing for p >= 1
    (so the iterates from the lower bound -1 increase monotonically to the root, quadratically near
    it, and G is exactly linear while only one entry is positive). Steps leaving the bracket
    [-1, -n^{-1/p}] (F >= 1 resp. F <= 1 there; possible for p < 1) fall back to bisection. A row
    stops at |F - 1| <= 16 eps log2(n + 1) (the rounding of F itself) or when no representable
    progress is left. Returns (tau, rows, slack) with slack = 4 ulps + |F - 1| / |F'| (an estimate
    of |tau - tau*|): entries within slack of tau are on the support boundary to working precision
    and get weight 0 (as in ``sparsemax_kernels._power_tau``; exact 0 for an entry on the boundary).
    """
    n = z.shape[-1]
    m = m.double()
    p = p.double() if isinstance(p, Tensor) else p
    lo = torch.full_like(m, -1.0)
    hi = torch.full_like(m, -(1.0 / n) ** (1.0 / p)) if not isinstance(p, Tensor) else -torch.pow(1.0 / n, 1.0 / p).expand_as(m)
    lb, bm = (None, None) if dense else _subset_bound(z, lambda s, sm: _power_tau(s, sm, p, scale, dense=True)[0])
    if lb is not None:
        lo = torch.minimum(torch.maximum(lo, lb), hi)
    t = lo.clone()
    R = _DenseRows(z, scale, m) if dense else _rows_for(z, lo, scale, m, bm)
    pc = R.bc(p)
    eps, tiny = torch.finfo(torch.float64).eps, torch.finfo(torch.float64).tiny
    done = torch.zeros_like(t, dtype=torch.bool)
    slack = torch.zeros_like(t)
    for _ in range(_MAX_NEWTON):
        r = (R.z - R.bc(t)).clamp_min(0.0)
        rp = r.pow(pc)
        f = R.sum(rp)
        err = f - 1.0
        s1 = R.sum(torch.where(r > 0, rp / r, 0.0))  # sum r^{p-1} = -F'(tau) / p
        ulps = 4 * eps * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
        slack = torch.where(done, slack, ulps + err.abs() / (p * s1).clamp_min(tiny))
        done = done | (err.abs() <= 16 * eps * math.log2(R.z.shape[-1] + 1))  # ~ rounding of a torch sum
        if bool(done.all()):
            break
        g = f.pow(1.0 / p)
        nxt = t + (g - 1.0) * f / (g * s1).clamp_min(tiny)
        lo = torch.where(err >= 0, torch.maximum(lo, t), lo)
        hi = torch.where(err <= 0, torch.minimum(hi, t), hi)
        bad = ~((nxt > lo) & (nxt < hi)) | ~torch.isfinite(nxt)
        # no representable progress left (Newton step or bracket within a few ulps): t is as exact as
        # the dtype allows
        done = done | (~bad & ((nxt - t).abs() <= ulps)) | ((hi - lo) <= ulps)
        nxt = torch.where(bad, 0.5 * (lo + hi), nxt)
        done = done | (nxt == t)
        t = torch.where(done, t, nxt)
        R.shrink(lo)
        pc = R.bc(p)
    return t, R, slack


def _power_support(R, tau: Tensor, slack: Tensor, empty: Tensor | None):
    """R.support(tau), with r = 0 on the entries within slack of the boundary (see _power_tau)."""
    sup, r = R.support(tau, empty)
    return sup, torch.where(r > sup.bc(slack), r, 0.0)


# --------------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------------
def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """y_i = exp(x_i) / sum_j exp(x_j)  (Omega = negative Shannon entropy)."""
    _check_scores(x, "softmax")
    if x.numel() == 0:
        return _apply_last(None, x, dim)
    m = x.amax(dim, keepdim=True)
    empty = torch.isneginf(m)
    if bool(empty.any()):
        return torch.softmax(x.masked_fill(empty, 0.0), dim).masked_fill(empty, 0.0)
    return torch.softmax(x, dim)


# --------------------------------------------------------------------------------------------------
# shared forward / backward plumbing of the threshold maps
# --------------------------------------------------------------------------------------------------
def _save(ctx, x: Tensor, *tensors: Tensor, kernel: bool, nan: Tensor | None) -> None:
    """Record the path, the input dtype and the NaN rows; save the tensors the backward needs."""
    ctx.kernel, ctx.dtype, ctx.nan = kernel, x.dtype, nan
    ctx.save_for_backward(*tensors)


def _kernel_forward(ctx, x: Tensor, kernel: Callable, *args, extra: tuple = ()) -> Tensor:
    """y = kernel(x, *args) on the numba path; saves y (float32 for 16-bit x) and ``extra``."""
    y = _kernel_out(x, kernel, *args)
    _save(ctx, x, y, *extra, kernel=True, nan=_nan_rows(y) if y.shape[1] else None)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _grad_out(ctx, dx: Tensor) -> Tensor:
    """The input gradient in the input's dtype, NaN on the rows that were NaN."""
    dx = _with_nan(dx, ctx.nan)
    return dx if dx.dtype == ctx.dtype else dx.to(ctx.dtype)


def _torch_output(ctx, x: Tensor, sup, y: Tensor, nan: Tensor | None, *extra: Tensor) -> Tensor:
    """Torch path: save y (support layout, work dtype) and return it dense in x's dtype."""
    y = y.to(_work_dtype(x.dtype))
    ctx.sup = sup
    _save(ctx, x, y, *extra, kernel=False, nan=nan)
    return _with_nan(sup.dense(y), nan).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# sparsemax
# --------------------------------------------------------------------------------------------------
class _Sparsemax(torch.autograd.Function):
    """y = [x - tau]_+ ;  J = diag(s) - s s^T / |s|,  s = 1[y > 0].  x: (B, n)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        if _on_kernels(x):
            return _kernel_forward(ctx, x, _K.sparsemax_forward)
        xs, m, empty, nan = _rows_and_max(x)
        tau, R = _sparsemax_tau(xs, m)
        sup, r = R.support(tau, empty)
        return _torch_output(ctx, x, sup, r, nan)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        if ctx.kernel:
            return _grad_out(ctx, _kernel_vjp(y, g, _K.support_mean_backward, 0.0, np.inf))
        sup = ctx.sup
        s = torch.sign(y)
        gs = sup.take(g.to(y.dtype)) * s
        v = sup.sum(gs) / sup.sum(s).clamp_min(1.0)
        return _grad_out(ctx, sup.dense(gs - sup.bc(v) * s))


def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    """y = argmin_{y in simplex} ||y - x||^2 = [x - tau]_+  (Martins & Astudillo, 2016)."""
    _check_scores(x, "sparsemax")
    return _apply_last(_Sparsemax.apply, x, dim)


# --------------------------------------------------------------------------------------------------
# entmax (1.5 and general alpha)
# --------------------------------------------------------------------------------------------------
class _Entmax15(torch.autograd.Function):
    """y = [x/2 - tau]_+^2 ;  J = diag(g) - g g^T / sum(g),  g = sqrt(y).  x: (B, n)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        if _on_kernels(x):
            return _kernel_forward(ctx, x, _K.quadratic_forward, 0.5, 2)
        xs, m, empty, nan = _rows_and_max(x)
        tau, R = _quadratic_tau(xs, m, 0.5)
        sup, r = R.support(tau, empty)
        y = r * r
        return _torch_output(ctx, x, sup, y / sup.bc(sup.sum(y).clamp_min(1e-300)), nan)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        if ctx.kernel:
            return _grad_out(ctx, _kernel_vjp(y, g, _K.entmax15_backward))
        sup = ctx.sup
        gp = y.sqrt()
        dx = sup.take(g.to(y.dtype)) * gp
        q = sup.sum(dx) / sup.sum(gp).clamp_min(torch.finfo(y.dtype).tiny)
        return _grad_out(ctx, sup.dense(dx - sup.bc(q) * gp))


def entmax15(x: Tensor, dim: int = -1) -> Tensor:
    """1.5-entmax: y = [x/2 - tau]_+^2  (Peters et al., 2019); Omega = Tsallis 1.5-negentropy.

    (Since the block-maxima bound, this sort-free solver is faster than the ``entmax`` package's
    sort-based one also on short rows: bench/bench_maps.py.)"""
    _check_scores(x, "entmax15")
    return _apply_last(_Entmax15.apply, x, dim)


class _EntmaxAlpha(torch.autograd.Function):
    """y = [(alpha-1) x - tau]_+^{1/(alpha-1)}, alpha > 1 per row; gradients for x and alpha.

    d/dx: J = diag(g) - g g^T / sum(g) with g = y^{2-alpha} on the support (Peters et al. 2019).
    d/dalpha: Correia et al. (2019), as in entmax.EntmaxBisectFunction.  x: (B, n), alpha: (B, 1).
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor) -> Tensor:
        if _on_kernels(x):
            am1 = _np(alpha.double().reshape(-1)) - 1.0
            return _kernel_forward(ctx, x, _K.power_forward, am1, 1.0 / am1, 1.0 / am1, extra=(alpha,))
        xs, m, empty, nan = _rows_and_max(x)
        am1 = alpha.double() - 1.0
        tau, R, slack = _power_tau(xs, m, 1.0 / am1, scale=am1)
        sup, r = _power_support(R, tau, slack, empty)
        y = r.pow(sup.bc(1.0 / am1))
        return _torch_output(ctx, x, sup, y / sup.bc(sup.sum(y).clamp_min(1e-300)), nan, alpha)

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, alpha = ctx.saved_tensors
        need_alpha = ctx.needs_input_grad[1]
        if ctx.kernel:
            d_alpha = np.empty(y.shape[0])
            dx = _kernel_vjp(y, dy, _K.entmax_backward, _np(alpha.double().reshape(-1)), d_alpha, need_alpha)
            grad_alpha = torch.from_numpy(d_alpha).to(alpha.dtype).view_as(alpha) if need_alpha else None
            return _grad_out(ctx, dx), _with_nan(grad_alpha, ctx.nan) if need_alpha else None
        sup = ctx.sup
        a = sup.bc(alpha.to(y.dtype))
        pos = y > 0
        gp = torch.where(pos, y.pow(2.0 - a), 0.0)
        gsum = sup.sum(gp).clamp_min(torch.finfo(y.dtype).tiny)
        g = sup.take(dy.to(y.dtype))
        dx = g * gp
        dx = dx - sup.bc(sup.sum(dx) / gsum) * gp
        d_alpha = None
        if need_alpha:
            s = torch.where(pos, y * torch.log(torch.where(pos, y, 1.0)), 0.0)
            ent = sup.bc(sup.sum(s))
            y_skew = gp / sup.bc(gsum)
            am1 = a - 1.0
            d_alpha = sup.sum(g * (y - y_skew) / am1 ** 2 - g * (s - y_skew * ent) / am1)
            d_alpha = _with_nan(d_alpha, ctx.nan).to(alpha.dtype)
        return _grad_out(ctx, sup.dense(dx)), d_alpha


def _alpha_last(alpha: Tensor, x: Tensor, dim: int) -> Tensor:
    """Bring a per-row alpha (broadcastable against x, size 1 along dim) to shape x.shape[:-1]+(1,)
    in the layout of x.movedim(dim, -1), in x's work dtype (float32 for 16-bit x)."""
    alpha = alpha.to(dtype=_work_dtype(x.dtype), device=x.device)
    if alpha.dim() == 0 or alpha.numel() == 1:
        alpha = alpha.reshape([1] * x.dim())
    elif alpha.dim() == x.dim():
        if alpha.shape[dim] != 1:
            raise ValueError("alpha must have size 1 along the normalized dim")
    else:
        raise ValueError(f"alpha of shape {tuple(alpha.shape)} must be a scalar or have x.dim()={x.dim()} "
                         "dims with size 1 along dim")
    shape = list(x.shape)
    shape[dim] = 1
    return alpha.expand(shape).movedim(dim, -1)


def entmax(x: Tensor, alpha: float | Tensor = 1.5, dim: int = -1) -> Tensor:
    """alpha-entmax: y = [(alpha-1) x - tau]_+^{1/(alpha-1)}, Omega = Tsallis alpha-negentropy.

    alpha: a finite float >= 1, or a tensor of such values broadcastable against x with size 1
    along ``dim`` (e.g. one alpha per head) which receives a gradient. alpha = 1 is softmax, 1.5 is
    entmax15, 2 is sparsemax (the float cases are dispatched to the exact special-purpose maps).
    """
    _check_scores(x, "entmax")
    if not isinstance(alpha, Tensor):
        alpha = _check_alpha(alpha, "entmax", strict=False)
        if alpha == 1.0:
            return softmax(x, dim)
        if alpha == 1.5:
            return entmax15(x, dim)
        if alpha == 2.0:
            return sparsemax(x, dim)
        alpha = torch.tensor(alpha, dtype=_work_dtype(x.dtype), device=x.device)
    a = _alpha_last(alpha, x, dim)
    if a.numel() == 0:
        return _apply_last(None, x, dim)
    a_min, a_max = torch.stack(torch.aminmax(a.detach())).tolist()  # one host sync for every check
    if not (a_min >= 1 and math.isfinite(a_max)):
        raise ValueError(f"entmax: alpha must be >= 1 and finite, got values in [{a_min}, {a_max}]")
    if x.numel() == 0:
        return _apply_last(None, x, dim)
    xl = x.movedim(dim, -1)
    if a_min > 1:
        return _EntmaxAlpha.apply(xl.reshape(-1, xl.shape[-1]), a.reshape(-1, 1)).reshape(xl.shape).movedim(-1, dim)
    is_one = a == 1.0  # rows with alpha = 1: softmax (the limit; the threshold form divides by alpha - 1)
    y = _EntmaxAlpha.apply(xl.reshape(-1, xl.shape[-1]), torch.where(is_one, 1.5, a).reshape(-1, 1))
    return torch.where(is_one, softmax(xl, -1), y.reshape(xl.shape)).movedim(-1, dim)


# --------------------------------------------------------------------------------------------------
# normmax
# --------------------------------------------------------------------------------------------------
class _Normmax(torch.autograd.Function):
    """alpha-normmax: y = argmax_{y in simplex} <x, y> - ||y||_alpha  (Santos et al., 2024).

    Stationarity: y = r^{1/(alpha-1)} / sum(r^{1/(alpha-1)}) with r = [x - tau]_+ and tau such that
    sum_i r_i^{alpha/(alpha-1)} = 1. Backward as entmax.NormmaxBisectFunction.  x: (B, n).
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        if _on_kernels(x):
            if alpha == 2.0:
                return _kernel_forward(ctx, x, _K.quadratic_forward, 1.0, 1)
            rows = np.ones(x.shape[0])
            return _kernel_forward(ctx, x, _K.power_forward, rows, rows * alpha / (alpha - 1.0), rows / (alpha - 1.0))
        xs, m, empty, nan = _rows_and_max(x)
        if alpha == 2.0:
            tau, R = _quadratic_tau(xs, m)
            sup, y = R.support(tau, empty)
        else:
            tau, R, slack = _power_tau(xs, m, alpha / (alpha - 1.0))
            sup, y = _power_support(R, tau, slack, empty)
        if alpha != 2.0:
            y = y.pow(1.0 / (alpha - 1.0))
        return _torch_output(ctx, x, sup, y / sup.bc(sup.sum(y).clamp_min(1e-300)), nan)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (y,) = ctx.saved_tensors
        if ctx.kernel:
            if ctx.alpha == 2.0:
                return _grad_out(ctx, _kernel_vjp(y, dy, _K.normmax2_backward)), None
            return _grad_out(ctx, _kernel_vjp(y, dy, _K.normmax_backward, ctx.alpha)), None
        sup, alpha = ctx.sup, ctx.alpha
        g = sup.take(dy.to(y.dtype))
        a = y
        b = torch.where(y > 0, y.pow(2.0 - alpha), 0.0) if alpha != 2.0 else torch.sign(y)
        dx = g * b
        dx = dx - sup.bc(sup.sum(dx)) * a
        q = sup.sum(g * a)
        dx = dx - sup.bc(q) * (b - sup.bc(sup.sum(b)) * a)
        dx = dx * sup.bc(sup.sum(a.pow(alpha)).pow((alpha - 1.0) / alpha)) / (alpha - 1.0)
        return _grad_out(ctx, sup.dense(dx)), None


def normmax(x: Tensor, alpha: float = 2.0, dim: int = -1) -> Tensor:
    """alpha-normmax (finite alpha > 1): Omega(y) = ||y||_alpha on the simplex (Santos et al., 2024)."""
    _check_scores(x, "normmax")
    alpha = _check_alpha(alpha, "normmax", strict=True)
    return _apply_last(lambda z: _Normmax.apply(z, alpha), x, dim)


# --------------------------------------------------------------------------------------------------
# k-subsets SparseMAP = projection onto the capped simplex {0 <= mu <= 1, sum mu = k}
# --------------------------------------------------------------------------------------------------
def _budget_tau(x: Tensor, m: Tensor, k: float, dense: bool = False, centered: bool = False):
    """tau with F(tau) = sum_i clip(x_i - m - tau, 0, 1) = k (rows with more than k finite entries):
    the threshold of the shifted scores x - m, m the row max, or (``centered``, dense only) the
    ceil(k)-th largest entry x_(ceil k), where tau lies in [-1, 0] (F(-1) >= k > F(0)) and x - m is
    exact for the entries near the root at any magnitude (see _KSubsets).

    F is piecewise linear and decreasing; from any tau the root of its current linear piece is
    tau + (F - k) / |A|, A = {0 < x - tau < 1}. Steps that leave the bracket [lo, hi] (F(lo) >= k >=
    F(hi)) are replaced by bisection; a step that stays on its piece lands exactly on the root.
    The iteration runs on the entries above lo only: lo = -2 where F(-2) >= k (checked on those
    entries), else lo = x_(ceil k) - m - 1 (the top ceil(k) entries give F(lo) >= ceil(k)).
    """
    m = m.double()
    hi = torch.zeros_like(m)  # F(0) = 0 from the max (< k from the centre)
    if centered:
        R = _DenseRows(x, 1.0, m)
        lo = torch.full_like(m, -1.0)
        return _budget_newton(R, k, lo.clone(), lo, hi), R
    lo = torch.full_like(m, -2.0)
    lb, bm = (None, None) if dense else _subset_bound(x, lambda s, sm: _budget_tau(s, sm, k, dense=True)[0],
                                                      need=int(np.floor(k)) + 1)
    if lb is not None:
        lo = torch.maximum(lo, lb)
    R = _DenseRows(x, 1.0, m) if dense else _rows_for(x, lo, 1.0, m, bm)
    if isinstance(R, _CompactRows):
        fail = R.sum((R.z - R.bc(lo)).clamp_(0.0, 1.0)) < k
        if bool(fail.any()):  # those rows: lo = x_(ceil k) - 1 (the top ceil(k) entries give F >= k)
            idx = fail.reshape(-1).nonzero().squeeze(1)
            xf = x.reshape(-1, x.shape[-1])[idx]
            lo = lo.clone()
            lo.view(-1)[idx] = xf.topk(int(np.ceil(k)), dim=-1).values[:, -1].double() - m.view(-1)[idx] - 1.0
            R = _rows_for(x, lo, 1.0, m)
    if isinstance(R, _DenseRows):
        lo = torch.where(torch.isfinite(R.z), R.z, 0.0).amin(-1, keepdim=True) - 1.0  # F(lo) = n_finite
        t = torch.full_like(m, -k / x.shape[-1])  # F(t) <= k: a close start from above
    else:
        t = lo.clone()
    return _budget_newton(R, k, t, lo, hi), R


def _budget_newton(R, k: float, t: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Safeguarded Newton on F(t) = sum clip(R.z - t, 0, 1) = k from t inside [lo, hi] (see _budget_tau)."""
    tol = 4e-13 * max(k, 1.0)
    done = torch.zeros_like(t, dtype=torch.bool)
    for _ in range(_MAX_NEWTON):
        c = (R.z - R.bc(t)).clamp_(0.0, 1.0)
        f = R.sum(c)
        na = R.sum(torch.sign(c * (1.0 - c)))
        gap = f - k
        done = done | (gap.abs() <= tol)
        if bool(done.all()):
            break
        lo = torch.where(gap >= 0, torch.maximum(lo, t), lo)
        hi = torch.where(gap <= 0, torch.minimum(hi, t), hi)
        nxt = torch.where(na > 0, t + gap / na.clamp_min(1.0), 0.5 * (lo + hi))
        bad = ~((nxt > lo) & (nxt < hi))
        nxt = torch.where(bad, 0.5 * (lo + hi), nxt)
        done = done | (nxt == t)
        t = torch.where(done, t, nxt)
        R.shrink(lo)
    return t


# torch path: a k-subsets root more than this below the max is re-solved centred on x_(ceil k) (there
# x - max has lost ulp(_RECENTER) ~ 1e-13 on the entries near the root, in float64)
_RECENTER = 1024.0


class _KSubsets(torch.autograd.Function):
    """mu = clip(x - tau, 0, 1) with sum mu = k;  J = diag(a) - a a^T / |a|,  a = 1[0 < mu < 1].

    x: (B, n). Rows with at most k finite entries (incl. fully masked rows) get mu = 1 on their
    finite entries (no choice left) and zero gradient. Torch path: solved on x - max; rows whose
    root lies more than _RECENTER below the max (entries far above the rest) are solved again
    centred on their ceil(k)-th largest entry (as the kernel does, below 2 there: float32 rows)."""

    @staticmethod
    def forward(ctx, x: Tensor, k: float) -> Tensor:
        if _on_kernels(x):
            return _kernel_forward(ctx, x, _K.k_subsets_forward, k)
        x_min, x_max = torch.aminmax(x, dim=-1, keepdim=True)  # one pass: masked entries, NaN rows
        has_masked, has_nan = torch.stack([torch.isneginf(x_min).any(), torch.isnan(x_max).any()]).tolist()
        nan = torch.isnan(x_max) if has_nan else None
        few = finite = None
        if has_masked or x.shape[-1] <= k:
            finite = torch.isfinite(x)
            few = finite.sum(-1, keepdim=True) <= k
            few = few if bool(few.any()) else None
        skip = few if nan is None else (nan if few is None else few | nan)
        xs, m = (x, x_max) if skip is None else (x.masked_fill(skip, 0.0), None)
        tau, R = _budget_tau(xs, xs.amax(-1, keepdim=True) if m is None else m, k)
        sup, r = R.support(tau, skip)
        mu = r.clamp_max_(1.0)
        far = tau < -_RECENTER if skip is None else (tau < -_RECENTER) & ~skip
        if bool(far.any()):  # re-solve centred on x_(ceil k); the outputs then go dense
            idx = far.reshape(-1).nonzero().squeeze(1)
            rows = xs[idx]
            tau_c, Rc = _budget_tau(rows, rows.topk(int(math.ceil(k)), dim=-1).values[:, -1:], k, centered=True)
            mu = sup.dense(mu)
            mu[idx] = (Rc.z - tau_c).clamp_(0.0, 1.0)
            sup = _DenseSupport()
        y = _torch_output(ctx, x, sup, mu, nan)  # rows in ``few``: 0 here (and zero gradient)
        return y if few is None else _with_nan(torch.where(few, finite.to(y.dtype), y), nan)

    @staticmethod
    def backward(ctx, g: Tensor):
        (mu,) = ctx.saved_tensors
        if ctx.kernel:
            return _grad_out(ctx, _kernel_vjp(mu, g, _K.support_mean_backward, 0.0, 1.0)), None
        sup = ctx.sup
        a = torch.sign(mu * (1.0 - mu))
        ga = sup.take(g.to(mu.dtype)) * a
        v = sup.sum(ga) / sup.sum(a).clamp_min(1.0)
        return _grad_out(ctx, sup.dense(ga - sup.bc(v) * a)), None


def k_subsets(x: Tensor, k: int = 2, dim: int = -1, normalize: bool = True) -> Tensor:
    """SparseMAP over k-subsets: mu = argmax_{mu in conv{z in {0,1}^n: sum z = k}} <x, mu> - ||mu||^2/2,
    i.e. the Euclidean projection of x onto {0 <= mu <= 1, sum mu = k} (Santos et al., 2024).

    k: an integer in [1, n]. Returns mu / k (sums to 1) when ``normalize`` (default), else the
    marginals mu (sum k, as in the paper's code). Rows with at most k unmasked entries give marginal 1
    to each of them (so their normalized weights sum to #unmasked / k).
    """
    _check_scores(x, "k_subsets")
    k = _check_k(k, "k_subsets", x.shape[dim] if x.dim() else None)
    normalize = _check_normalize(normalize, "k_subsets")
    mu = _apply_last(lambda z: _KSubsets.apply(z, float(k)), x, dim)
    return mu / k if normalize else mu


# --------------------------------------------------------------------------------------------------
# sequential k-subsets SparseMAP: active set + budgeted Viterbi oracle (numba, on the host)
# --------------------------------------------------------------------------------------------------
def _host_rows(x: Tensor) -> np.ndarray:
    """x (..., n) as a (B, n) float64 host array (any float dtype, also bfloat16); sequential
    k-subsets needs numba (sparsemax_kernels.py)."""
    if _K is None:
        raise ImportError("sequential_k_subsets needs numba (see requirements.txt: pip install -r requirements.txt)")
    return _np(x.detach().to(device="cpu", dtype=torch.float64)).reshape(-1, x.shape[-1])


def _host_scores(x: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows - row max, row max, NaN-row mask) of x (..., n) on the host, float64. Every structure
    scores k * max more on the raw rows, so the solution is that of the shifted rows (shift
    invariance; exact for the entries near the max at any offset). Fully masked / NaN rows: shift 0,
    NaN rows solved as zeros (their outputs are set to NaN)."""
    rows = _host_rows(x)
    nan = np.isnan(rows).any(1)
    if nan.any():
        rows = rows.copy()
        rows[nan] = 0.0
    m = rows.max(1, initial=-np.inf) if rows.shape[1] else np.zeros(rows.shape[0])
    m = np.where(np.isfinite(m), m, 0.0)
    return rows - m[:, None], m, nan


class _SequentialKSubsets(torch.autograd.Function):
    """SparseMAP marginals for the budgeted chain (``sparsemax_kernels.seq_forward``, float64, exact,
    on the max-shifted rows); backward from the active set (Niculae et al. 2018):

        J = Z_A^T (M^{-1} - M^{-1} 1 1^T M^{-1} / (1^T M^{-1} 1)) Z_A,   M = Z_A Z_A^T,

    with Z_A the structures with positive weight. The solver runs row by row on the host (its oracle
    is an O(n k) sequential dynamic program); CUDA tensors are copied there and back. Rows with a NaN
    give NaN (and NaN gradients).
    """

    @staticmethod
    def forward(ctx, x: Tensor, k: int, eta: float) -> Tensor:
        rows, _, nan = _host_scores(x)
        mu, ctx.pos, ctx.p = _K.seq_forward(rows, k, eta)
        mu[nan] = np.nan
        ctx.dtype, ctx.nan = x.dtype, nan
        return torch.from_numpy(mu).to(device=x.device, dtype=x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        dx = _K.seq_backward(ctx.pos, ctx.p, _host_rows(g))
        dx[ctx.nan] = np.nan
        return torch.from_numpy(dx).to(device=g.device, dtype=ctx.dtype).reshape(g.shape), None, None


def _check_transition(transition) -> float:
    if isinstance(transition, bool) or not isinstance(transition, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(transition)):
        raise ValueError(f"sequential_k_subsets: transition must be a finite number, got {transition!r}")
    return float(transition)


def sequential_k_subsets(x: Tensor, k: int = 2, dim: int = -1,
                         transition: float = SEQUENTIAL_TRANSITION_DEFAULT,
                         normalize: bool = True) -> Tensor:
    """SparseMAP over k-subsets with a chain structure (Santos et al., 2024, "sequential k-subsets").

    Structures: z in {0,1}^n with sum z = k, scored <x, z> + transition * sum_i z_i z_{i+1}
    (a bonus for each pair of consecutive selected items). The map returns the unary marginals

        mu = E_p[z],  p = argmax_{p in simplex} sum_z p_z score(z) - 1/2 ||E_p[z]||^2

    (only the unary marginals are regularized, as in LP-SparseMAP's SequenceBudget factor used by the
    paper), solved exactly by the active-set method with a budgeted Viterbi MAP oracle, in float64 on
    the scores minus their row max (shift invariant). k: an integer in [1, n]. Rows with at most k
    unmasked entries select all of them. ``transition`` defaults to 100, the value in the paper's code
    (deep-spin/SSHN scripts/utils.py). Returns mu / k when ``normalize`` (default), else mu (sum k,
    as in the paper's code).
    """
    _check_scores(x, "sequential_k_subsets")
    k = _check_k(k, "sequential_k_subsets", x.shape[dim] if x.dim() else None)
    transition = _check_transition(transition)
    normalize = _check_normalize(normalize, "sequential_k_subsets")
    mu = _apply_last(lambda z: _SequentialKSubsets.apply(z, k, transition), x, dim)
    return mu / k if normalize else mu


def sequential_k_subsets_value(x: Tensor, k: int = 2,
                               transition: float = SEQUENTIAL_TRANSITION_DEFAULT) -> Tensor:
    """Optimal value of the sequential k-subsets SparseMAP problem along the last dim (finite x):

        Omega*(x) = max_p sum_z p_z score(z) - 1/2 ||E_p[z]||^2,   score(z) = <x, z> + transition * #pairs(z),

    a convex function whose gradient is the marginals mu (Danskin). ``layers.energy`` uses it for the
    Hopfield-Fenchel-Young energy of this mode. Solved on x - max (Omega*(x) = Omega*(x - m) + k m).
    No autograd; returns x.shape[:-1] in x's dtype (NaN for rows with a NaN).
    """
    _check_scores(x, "sequential_k_subsets_value")
    k = _check_k(k, "sequential_k_subsets_value", x.shape[-1] if x.dim() else None)
    transition = _check_transition(transition)
    if x.numel() == 0:
        return x.new_zeros(x.shape[:-1])
    rows, m, nan = _host_scores(x)
    value = _K.seq_value(rows, k, transition) + k * m
    value[nan] = np.nan
    return torch.from_numpy(value).to(device=x.device, dtype=x.dtype).reshape(x.shape[:-1])


# --------------------------------------------------------------------------------------------------
# mode names
# --------------------------------------------------------------------------------------------------
MODE_PARAMS = {"softmax": (), "sparsemax": (), "entmax": (), "entmax_alpha": ("alpha",), "gsh": ("alpha",),
               "normmax": ("alpha",), "k_subsets": ("k", "normalize"),
               "sequential_k_subsets": ("k", "transition", "normalize")}
# the value a map parameter takes when not given (get_map, layers.energy, the gsh layers' initial alpha)
MODE_DEFAULTS = {"entmax_alpha": {"alpha": 1.5}, "gsh": {"alpha": 1.5}, "normmax": {"alpha": 2.0},
                 "k_subsets": {"k": 2, "normalize": True},
                 "sequential_k_subsets": {"k": 2, "transition": SEQUENTIAL_TRANSITION_DEFAULT, "normalize": True}}


def with_defaults(mode: str, params: dict) -> dict:
    """``params`` completed by the mode's ``MODE_DEFAULTS``."""
    return {**MODE_DEFAULTS.get(mode, {}), **params}


def _check_params(mode: str, params: dict) -> None:
    """The parameter names a mode takes (a misspelled or foreign one is an error, not ignored)."""
    if mode not in MODE_PARAMS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    unknown = sorted(set(params) - set(MODE_PARAMS[mode]))
    if unknown:
        allowed = ", ".join(MODE_PARAMS[mode]) or "none"
        raise TypeError(f"mode {mode!r} got unexpected parameter(s) {', '.join(unknown)}; it takes: {allowed}")


def get_map(mode: str, **params) -> Callable[[Tensor], Tensor]:
    """Return ``f(x)`` normalizing over the last dim for a mode name (see ``MODES``).

    params (``MODE_PARAMS``; any other name is a TypeError, values are checked here): ``alpha``
    (entmax_alpha, gsh: float or tensor; normmax: float), ``k`` (k_subsets, sequential_k_subsets),
    ``transition`` (sequential_k_subsets), ``normalize`` (SparseMAP maps). ``gsh`` clamps alpha to
    [1 + 1e-3, 2] (learnable alpha per head kept in (1, 2]).
    """
    _check_params(mode, params)
    if "k" in params:
        _check_k(params["k"], mode)
    if "normalize" in params:
        _check_normalize(params["normalize"], mode)
    if "transition" in params:
        _check_transition(params["transition"])
    alpha = params.get("alpha")
    if alpha is not None and not isinstance(alpha, Tensor):
        _check_alpha(alpha, mode, strict=mode == "normmax")
    params = with_defaults(mode, params)
    if mode == "softmax":
        return partial(softmax, dim=-1)
    if mode == "sparsemax":
        return partial(sparsemax, dim=-1)
    if mode == "entmax":
        return partial(entmax15, dim=-1)
    if mode == "entmax_alpha":
        return partial(entmax, alpha=params["alpha"], dim=-1)
    if mode == "gsh":
        alpha = params["alpha"]
        alpha = alpha.clamp(1.0 + 1e-3, 2.0) if isinstance(alpha, Tensor) else min(max(alpha, 1.0 + 1e-3), 2.0)
        return partial(entmax, alpha=alpha, dim=-1)
    if mode == "normmax":
        return partial(normmax, alpha=params["alpha"], dim=-1)
    if mode == "k_subsets":
        return partial(k_subsets, k=params["k"], dim=-1, normalize=params["normalize"])
    return partial(sequential_k_subsets, k=params["k"], dim=-1, transition=params["transition"],
                   normalize=params["normalize"])
