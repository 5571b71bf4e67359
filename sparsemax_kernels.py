"""CPU kernels (numba) behind the normalization maps of ``sparsemax.py``.

Every threshold map reduces, row by row, to a 1-d root finding in tau followed by an element-wise
output. In eager PyTorch each iteration of that search is a handful of full-tensor ops, so on short
rows (n = 64) the maps were op-overhead bound at 10-40x ``torch.softmax``. Here one compiled loop
handles a row at a time with the solvers of ``sparsemax.py`` (which stay the path for CUDA tensors and
when numba is missing; k-subsets brackets its root by its own Newton iterates here instead of a top-k):

  * each row is first written, shifted and scaled, to a scratch row u = s (x - c) (c = the row max, so
    the root lies in [-1, 0]); the subtraction is exact for the entries near the root, so precision
    does not depend on the offset of the scores.
  * sparsemax, 1.5-entmax, 2-normmax, k-subsets: each solver iteration is one vectorized sweep over u
    (count, sum, sum of squares above t), the output one more; arithmetic in the input's dtype
    (float32 rows in float32, 8 SIMD lanes; float64 rows in float64).
  * alpha-entmax, alpha-normmax (float64 arithmetic): pow() is the cost, so a pow-free root (sparsemax,
    quadratic, or a power-of-two exponent by Newton) first brackets tau from below, and the Newton
    iterations on sum [u - t]_+^p = 1 run on the entries above that bound only.
  * backward passes: one or two sweeps per row (pow only on the support).

tests/test_sparsemax.py runs every test on both paths and cross-checks them.
Conventions: inputs are C-contiguous (B, n) float32/float64 arrays, -inf = masked (weight exactly 0),
a fully masked row gives zeros, a row holding a NaN gives NaN. Kernels are single-threaded (``nogil``): one trial = one core.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

_JIT = dict(cache=True, nogil=True)
# reductions may be reassociated (vectorized sums); no ninf: -inf marks masked entries
_FAST = dict(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract", "arcp"})
_MAX_MATH = dict(cache=True, nogil=True, fastmath={"nnan", "reassoc", "nsz"})  # _row_max only: NaN rows are caught by _shift
_TINY = np.finfo(np.float64).tiny
_EPS = np.finfo(np.float64).eps
_EPS32 = float(np.finfo(np.float32).eps)
_MAX_ITER = 100


# --------------------------------------------------------------------------------------------------
# per-row helpers: shifted scratch row, sweeps, candidate buffers, threshold solvers, outputs
#
# Each forward kernel first writes the row, shifted and scaled, to a scratch row u = s (x - c), c the
# row max (the root of sparsemax/entmax/normmax is then in [-1, 0]; k-subsets re-centers on its root
# when that lies more than 2 below the max). The subtraction is exact for every entry within a factor
# 2 of c and rounds to |u| eps otherwise, so the entries near the root keep their full precision
# however large x is; the solver sweeps then read u only (no conversions, no writes) and one last
# pass writes the output. Arithmetic is in u's dtype:
# the input's for sparsemax, entmax15, 2-normmax and k-subsets (float32 rows in float32: 8 SIMD lanes;
# the output is accurate to a few float32 ulps), float64 for the pow-based alpha-entmax/normmax.
# --------------------------------------------------------------------------------------------------
@nb.njit(**_MAX_MATH)
def _row_max(x):
    """max of a row in its dtype (8 independent accumulators: no serial max chain)."""
    n = x.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x.dtype.type(-np.inf)
    i = 0
    while i + 8 <= n:
        m0, m1, m2, m3 = max(m0, x[i]), max(m1, x[i + 1]), max(m2, x[i + 2]), max(m3, x[i + 3])
        m4, m5, m6, m7 = max(m4, x[i + 4]), max(m5, x[i + 5]), max(m6, x[i + 6]), max(m7, x[i + 7])
        i += 8
    while i < n:
        m0 = max(m0, x[i])
        i += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@nb.njit(**_JIT)
def _shift(x, c, s, u) -> bool:
    """u = (x - c) s in u's dtype (no fastmath: the subtraction must not be reassociated); returns
    whether x holds a NaN (such a row's output is NaN)."""
    nan = False
    for i in range(x.shape[0]):
        xi = x[i]
        u[i] = (u.dtype.type(xi) - c) * s
        nan |= xi != xi
    return nan


@nb.njit(**_JIT)
def _fill_empty(x, y) -> None:
    """Output of a row whose max is -inf: zeros (fully masked), or NaN if it holds a NaN."""
    nan = False
    for i in range(x.shape[0]):
        nan |= x[i] != x[i]
    y[:] = np.nan if nan else 0


@nb.njit(**_FAST)
def _count_finite(x):
    """(#{x_i > -inf}, #{x_i NaN}) (in x's dtype, vectorized)."""
    zero, one = x.dtype.type(0), x.dtype.type(1)
    cnt, nan = zero, zero
    for i in range(x.shape[0]):
        cnt += one if x[i] > -np.inf else zero
        nan += one if x[i] != x[i] else zero
    return cnt, nan


@nb.njit(**_FAST)
def _above_stats(u, t):
    """Over S = {u > t}: (|S|, sum (u - t), sum (u - t)^2), one vectorized sweep in u's dtype."""
    zero = u.dtype.type(0)
    one = u.dtype.type(1)
    cnt, r1, r2 = zero, zero, zero
    for i in range(u.shape[0]):
        d = max(u[i] - t, zero)
        cnt += one if d > 0 else zero
        r1 += d
        r2 += d * d
    return cnt, r1, r2


@nb.njit(**_FAST)
def _write_power(u, t, y, power: int, inv) -> None:
    """y = [u - t]_+^power * inv (power 1 or 2)."""
    zero = u.dtype.type(0)
    for i in range(u.shape[0]):
        d = max(u[i] - t, zero)
        y[i] = (d if power == 1 else d * d) * inv


@nb.njit(**_JIT)
def _collect_above(u, thr, vals, idx) -> int:
    """vals/idx[:c] = the entries u_i > thr and their indices (branch-free); returns c."""
    c = 0
    for i in range(u.shape[0]):
        z = u[i]
        vals[c] = z
        idx[c] = i
        c += z > thr
    return c


@nb.njit(**_JIT)
def _keep_above(vals, idx, c: int, lo: float) -> int:
    """Compact vals/idx[:c] to the entries > lo (branch-free); returns the new count."""
    keep = 0
    for j in range(c):
        z = vals[j]
        vals[keep] = z
        idx[keep] = idx[j]
        keep += z > lo
    return keep


@nb.njit(**_JIT)
def _sparsemax_root(u, t):
    """Root of sum [u - tau]_+ = 1 from a lower bound t (u's dtype).

    Michelot: t' = t + (sum [u - t]_+ - 1) / |S|, S = {u > t}; the iterates increase to tau, and once S
    keeps its size t (computed from that same S) is exact."""
    one = u.dtype.type(1)
    prev = -one
    for _ in range(u.shape[0] + 2):
        cnt, r1, _r2 = _above_stats(u, t)
        if cnt == prev:
            break
        prev = cnt
        t = t + (r1 - one) / max(cnt, one)
    return t


@nb.njit(**_JIT)
def _quadratic_root(u, t):
    """Root of F(t) = sum [u - t]_+^2 = 1 from a lower bound t -> (tau, sum [u - tau]_+,
    sum [u - tau]_+^2) (u's dtype).

    Each sweep gives S = {u > t}; t' = the smaller root of the quadratic sum_S (u - t')^2 = 1, which is
    exact when S(t') = S (the next sweep sees the same count and ends), an upper bound of tau when t was
    a lower bound (S a superset of the support), and a lower bound when t was an upper bound (S a
    subset). Where that quadratic has no real root (S far too large, at a lower bound): a Newton step on
    G = F^(1/2), convex and decreasing, so it stays below tau. As ``sparsemax._quadratic_tau``."""
    one = u.dtype.type(1)
    tiny = u.dtype.type(1e-30)
    lo = t
    from_closed, cnt_src = False, -one
    for _ in range(_MAX_ITER):
        cnt, r1, r2 = _above_stats(u, t)
        if from_closed and cnt == cnt_src:
            break
        if r2 >= one:
            lo = max(lo, t)
        n_sup = max(cnt, one)
        disc = r1 * r1 - n_sup * (r2 - one)
        use_closed = disc >= 0
        if use_closed:
            nxt = t + (r1 - math.sqrt(disc)) / n_sup
        else:
            g = math.sqrt(r2)
            nxt = max(t + (g - one) * g / max(r1, tiny), lo)
        if nxt == t:
            break
        from_closed, cnt_src, t = use_closed, cnt, nxt
    else:  # iteration cap: the stats of the last iterate
        _cnt, r1, r2 = _above_stats(u, t)
    return t, r1, r2


@nb.njit(**_JIT)
def _power_tau(vals, idx, c: int, lo: float, hi: float, p: float):
    """Root of F(t) = sum [z - t]_+^p = 1 in [lo, hi]: Newton on G = F^(1/p) (convex, decreasing for
    p >= 1), bisection when a step leaves the bracket; stops at |F - 1| <= 4 c eps (the rounding of
    F itself) or when no representable progress is left. As ``sparsemax._power_tau``.

    -> (tau, count, slack): slack = 4 ulps + |F - 1| / |F'| estimates |tau - tau*|. An entry within
    slack above tau sits on the support boundary to working precision; its exact weight could be
    anything up to slack^(1/(alpha-1)) (1e-4 at alpha 5 for slack 1e-16), so _write_normalized gives
    it weight 0 (an entry exactly on the boundary then gets exactly 0 at any alpha)."""
    t = lo
    slack = 0.0
    for _ in range(_MAX_ITER):
        c = _keep_above(vals, idx, c, lo)
        f, s1 = 0.0, 0.0
        for j in range(c):
            d = max(vals[j] - t, 0.0)
            dp = d * d if p == 2.0 else d ** p
            f += dp
            s1 += dp / d if d > 0 else 0.0
        err = f - 1.0
        ulps = 4 * _EPS * max(abs(hi), abs(lo), 1.0)
        slack = ulps + abs(err) / max(p * s1, _TINY)
        if abs(err) <= 4 * c * _EPS:
            break
        g = f ** (1.0 / p)
        nxt = t + (g - 1.0) * f / max(g * s1, _TINY)
        if err >= 0 and t > lo:
            lo = t
        if err <= 0 and t < hi:
            hi = t
        bad = not (lo < nxt < hi) or not math.isfinite(nxt)
        if (not bad and abs(nxt - t) <= ulps) or hi - lo <= ulps:
            break
        if bad:
            nxt = 0.5 * (lo + hi)
        if nxt == t:
            break
        t = nxt
    return t, c, slack


@nb.njit(**_JIT)
def _write_normalized(out, vals, idx, c: int, tau: float, power: float, slack: float) -> None:
    """out = 0 except out[idx_j] = r_j^power / sum_j r_j^power, r = [vals - tau]_+, and r = 0 within
    ``slack`` of the boundary (see _power_tau; power 1 and 2 without pow)."""
    out[:] = 0
    total = 0.0
    for j in range(c):
        d = vals[j] - tau
        if d > slack:
            r = d if power == 1.0 else (d * d if power == 2.0 else d ** power)
        else:
            r = 0.0
        vals[j] = r
        total += r
    total = max(total, 1e-300)
    for j in range(c):
        if vals[j] > 0:
            out[idx[j]] = vals[j] / total


# --------------------------------------------------------------------------------------------------
# forward kernels: x (B, n) -> y (B, n)
# --------------------------------------------------------------------------------------------------
@nb.njit(**_JIT)
def sparsemax_forward(x, y) -> None:
    """y = [x - tau]_+ with sum y = 1 (in x's dtype, on u = x - max)."""
    u = np.empty(x.shape[1], x.dtype)
    one = x.dtype.type(1)
    for b in range(x.shape[0]):
        m = _row_max(x[b])
        if m == -np.inf:
            _fill_empty(x[b], y[b])
            continue
        if _shift(x[b], m, one, u):
            y[b, :] = np.nan
            continue
        _write_power(u, _sparsemax_root(u, -one), y[b], 1, one)


@nb.njit(**_JIT)
def quadratic_forward(x, y, scale: float, power: int) -> None:
    """r = [scale x - tau]_+ with sum r^2 = 1; y = r^power / sum r^power (in x's dtype, on
    u = scale (x - max)).

    1.5-entmax: scale 1/2, power 2; 2-normmax: scale 1, power 1."""
    u = np.empty(x.shape[1], x.dtype)
    one, s = x.dtype.type(1), x.dtype.type(scale)
    for b in range(x.shape[0]):
        m = _row_max(x[b])
        if m == -np.inf:
            _fill_empty(x[b], y[b])
            continue
        if _shift(x[b], m, s, u):
            y[b, :] = np.nan
            continue
        tau, r1, r2 = _quadratic_root(u, -one)
        total = r1 if power == 1 else r2
        _write_power(u, tau, y[b], power, one / max(total, x.dtype.type(1e-30)))


@nb.njit(**_FAST)
def _dyadic_stats(u, t: float, j: int):
    """(sum r^q, sum r^(q-1)), r = [u - t]_+, q = 2^j (powers by squaring), vectorized."""
    f, s1 = 0.0, 0.0
    for i in range(u.shape[0]):
        r = max(u[i] - t, 0.0)
        rq = r
        for _ in range(j):
            rq = rq * rq
        f += rq
        s1 += rq / r if r > 0 else 0.0
    return f, s1


@nb.njit(**_JIT)
def _dyadic_lower_bound(u, j: int) -> float:
    """A lower bound of the root of sum [u - t]_+^q = 1, q = 2^j, max u = 0: Newton on G = F^(1/q)
    (convex, decreasing) from -1; its iterates increase towards the root from below, so any of them is
    a lower bound. Stops at F <= 1 + 1e-6 (pow-free: q-th roots by repeated sqrt)."""
    t = -1.0
    for _ in range(_MAX_ITER):
        f, s1 = _dyadic_stats(u, t, j)
        if f <= 1.0 + 1e-6:
            break
        g = f
        for _ in range(j):
            g = math.sqrt(g)
        nxt = t + (g - 1.0) * f / max(g * s1, _TINY)
        if not nxt > t:
            break
        t = nxt
    return t


@nb.njit(**_JIT)
def _power_bracket(u, p: float):
    """[lo, hi] around the root of sum [u - t]_+^p = 1 (max u = 0). hi = -n^(-1/p); lo from a pow-free
    root: all r = u - t <= 1 for t >= -1, so r^p >= r^q for q >= p, and the root for exponent q
    (sparsemax q = 1; quadratic q = 2; q = 4, 8, ..., 64 by Newton) is a lower bound."""
    lo, hi = -1.0, -((1.0 / u.shape[0]) ** (1.0 / p))
    if p <= 1.0:
        lo = _sparsemax_root(u, -1.0)
    elif p <= 2.0:
        lo = _quadratic_root(u, -1.0)[0]
    elif p <= 64.0:
        lo = _dyadic_lower_bound(u, int(math.ceil(math.log2(p))))
    return min(lo - (abs(lo) + 1.0) * 1e-12, hi), hi


@nb.njit(**_JIT)
def power_forward(x, y, scale, p, out_power) -> None:
    """r = [scale_b x - tau]_+ with sum r^(p_b) = 1; y = r^(out_b) / sum r^(out_b), per-row arrays
    scale, p, out_power (B,); float64 arithmetic on u = scale_b (x - max).

    alpha-entmax: scale = alpha - 1, p = out = 1/(alpha - 1); alpha-normmax: scale 1,
    p = alpha/(alpha - 1), out = 1/(alpha - 1). Newton runs on the entries above the bracket's
    lower end only (the pow calls are the cost)."""
    n = x.shape[1]
    u, vals, idx = np.empty(n), np.empty(n), np.empty(n, np.int64)
    for b in range(x.shape[0]):
        m = _row_max(x[b])
        if m == -np.inf:
            _fill_empty(x[b], y[b])
            continue
        if _shift(x[b], np.float64(m), scale[b], u):
            y[b, :] = np.nan
            continue
        lo, hi = _power_bracket(u, p[b])
        c = _collect_above(u, lo, vals, idx)
        tau, c, slack = _power_tau(vals, idx, c, lo, hi, p[b])
        _write_normalized(y[b], vals, idx, c, tau, out_power[b], slack)


@nb.njit(**_FAST)
def _clip_stats(u, t):
    """Over A = {0 < u - t < 1} and U = {u - t >= 1}: (sum_A (u - t), |A|, |U|), one vectorized sweep in
    u's dtype (sum clip(u - t, 0, 1) = |U| + sum_A (u - t), the integer part exact)."""
    zero = u.dtype.type(0)
    one = u.dtype.type(1)
    fa, na, n1 = zero, zero, zero
    for i in range(u.shape[0]):
        d = u[i] - t
        c = min(max(d, zero), one)
        fa += c if c < one else zero
        na += one if zero < d < one else zero
        n1 += one if d >= one else zero
    return fa, na, n1


@nb.njit(**_FAST)
def _write_clip(u, t, y) -> None:
    """y = clip(u - t, 0, 1)."""
    zero = u.dtype.type(0)
    one = u.dtype.type(1)
    for i in range(u.shape[0]):
        y[i] = min(max(u[i] - t, zero), one)


@nb.njit(**_JIT)
def _budget_root(u, k, t, lo, hi, tol, floor):
    """Root of the piecewise-linear, decreasing F(t) = sum clip(u - t, 0, 1) = k from the start t,
    F(lo) >= k >= F(hi) (lo may be -inf: unknown yet; u's dtype). Newton, t' = t + (F - k) / |A|,
    A = {0 < u - t < 1}, inside the bracket [lo, hi] the iterates build; with no active entry:
    bisection, or, while no lower end is known, steps down by 1, 2, 4, ... A Newton step that stays on
    its linear piece lands on the root: the sweep that finds A and U = {u - t >= 1} unchanged after
    one (or |F - k| <= tol |A|, the rounding of sum_A) ends it. Needs more than k finite entries
    (F -> #finite as t -> -inf). Returns (tau, ok); ok is False when the search for a lower end would
    step below ``floor`` (the root lies far down: the caller recenters, see k_subsets_forward)."""
    half, one = u.dtype.type(0.5), u.dtype.type(1)
    step = one
    newton, na_prev, n1_prev = False, -half, -half
    for _ in range(_MAX_ITER):
        fa, na, n1 = _clip_stats(u, t)
        gap = (n1 - k) + fa
        if abs(gap) <= tol * max(na, one) or (newton and na == na_prev and n1 == n1_prev):
            break
        if gap >= 0:
            lo = max(lo, t)
        if gap <= 0:
            hi = min(hi, t)
        nxt = t + gap / na if na > 0 else t
        newton = na > 0 and lo < nxt < hi
        if not newton and lo > -np.inf:
            nxt = half * (lo + hi)
        elif not newton:
            if t - step < floor:  # no entry active and F < k down to the floor: the root is below it
                return t, False
            nxt, step = t - step, step + step
        if nxt == t:
            break
        t, na_prev, n1_prev = nxt, na, n1
    return t, True


@nb.njit(**_JIT)
def _kth_largest(x, top):
    """The k-th largest entry of a row, k = len(top): one sweep keeping the k largest, sorted
    descending, in the scratch array top (an entry below the current k-th costs one comparison)."""
    k = top.shape[0]
    top[:] = -np.inf
    for i in range(x.shape[0]):
        v = x[i]
        if v > top[k - 1]:
            j = k - 1
            while j > 0 and top[j - 1] < v:
                top[j] = top[j - 1]
                j -= 1
            top[j] = v
    return top[k - 1]


@nb.njit(**_JIT)
def k_subsets_forward(x, mu, k: float) -> None:
    """mu = clip(x - tau, 0, 1) with sum mu = k (rows with more than k finite entries; others get
    mu = 1 on their finite entries; rows with a NaN get NaN), in x's dtype on u = x - c: first
    c = max x (Newton from -1); a root below -2 (entries far above the rest) is solved
    again on u = x - x_(ceil k), the ceil(k)-th largest entry, where it lies in [-1, 0] (F(-1) >= k > F(0)):
    the subtraction is exact for the entries near the root, whatever their magnitude.
    ``sparsemax._budget_tau`` (the torch path) solves the same F(t) = k by Newton too."""
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    kk = x.dtype.type(k)
    ninf = x.dtype.type(-np.inf)
    tol = x.dtype.type(4 * (_EPS if x.itemsize == 8 else _EPS32))  # per active entry
    u = np.empty(x.shape[1], x.dtype)
    top = np.empty(min(int(math.ceil(k)), x.shape[1]), x.dtype)
    for b in range(x.shape[0]):
        row, out = x[b], mu[b]
        cnt, nan = _count_finite(row)
        if nan > 0:
            out[:] = np.nan
            continue
        if cnt <= k:  # at most k finite entries (incl. fully masked rows): all selected
            for i in range(row.shape[0]):
                out[i] = one if row[i] > -np.inf else zero
            continue
        _shift(row, _row_max(row), one, u)
        t, ok = _budget_root(u, kk, -one, ninf, zero, tol, -4 * one)
        if not ok or t < -2 * one:
            _shift(row, _kth_largest(row, top), one, u)
            t, ok = _budget_root(u, kk, -one, -one, zero, tol, ninf)
        _write_clip(u, t, out)


# --------------------------------------------------------------------------------------------------
# backward kernels (vector-Jacobian products): y, g (B, n) -> dx (B, n), in y's dtype
# --------------------------------------------------------------------------------------------------
@nb.njit(**_FAST)
def support_mean_backward(y, g, dx, lower: float, upper: float) -> None:
    """dx = s * (g - mean_{s} g), s = 1[lower < y < upper]: the Jacobian diag(s) - s s^T / |s| of
    sparsemax (s = 1[y > 0]) and of the k-subsets projection (s = 1[0 < mu < 1])."""
    zero = y.dtype.type(0)
    one = y.dtype.type(1)
    lo, hi = y.dtype.type(lower), y.dtype.type(upper)
    for b in range(y.shape[0]):
        tot, cnt = zero, zero
        for i in range(y.shape[1]):
            s = lo < y[b, i] < hi
            tot += g[b, i] if s else zero
            cnt += one if s else zero
        v = tot / max(cnt, one)
        for i in range(y.shape[1]):
            dx[b, i] = g[b, i] - v if lo < y[b, i] < hi else zero


@nb.njit(**_FAST)
def entmax15_backward(y, g, dx) -> None:
    """1.5-entmax VJP: w = sqrt(y), dx = (g - (sum g w) / sum w) w (vectorized)."""
    zero = y.dtype.type(0)
    tiny = y.dtype.type(1e-30)
    for b in range(y.shape[0]):
        wsum, gw = zero, zero
        for i in range(y.shape[1]):
            w = math.sqrt(y[b, i])
            wsum += w
            gw += g[b, i] * w
        q = gw / max(wsum, tiny)
        for i in range(y.shape[1]):
            dx[b, i] = (g[b, i] - q) * math.sqrt(y[b, i])


@nb.njit(**_FAST)
def normmax2_backward(y, g, dx) -> None:
    """2-normmax VJP: ``normmax_backward`` with alpha = 2 (b = 1[y > 0]), vectorized."""
    zero = y.dtype.type(0)
    one = y.dtype.type(1)
    for b in range(y.shape[0]):
        sgb, sgy, sb, syy = zero, zero, zero, zero
        for i in range(y.shape[1]):
            yi = y[b, i]
            bi = one if yi > 0 else zero
            sgb += g[b, i] * bi
            sgy += g[b, i] * yi
            sb += bi
            syy += yi * yi
        scale = math.sqrt(syy)
        for i in range(y.shape[1]):
            yi = y[b, i]
            bi = one if yi > 0 else zero
            dx[b, i] = scale * (g[b, i] * bi - sgb * yi - sgy * (bi - sb * yi))


@nb.njit(**_JIT)
def _positive(y, idx) -> int:
    """idx[:c] = indices of y > 0 (branch-free); returns c."""
    c = 0
    for i in range(y.shape[0]):
        idx[c] = i
        c += y[i] > 0
    return c


@nb.njit(**_JIT)
def entmax_backward(y, g, dx, alpha, d_alpha, need_alpha: bool) -> None:
    """alpha-entmax VJP, alpha (B,) per row: with w = y^(2 - alpha) on the support,
    dx = g w - w (sum g w) / sum w  (Peters et al. 2019); d_alpha as Correia et al. (2019):
    sum g (y - w~) / (alpha-1)^2 - g (y log y - w~ sum y log y) / (alpha-1),  w~ = w / sum w."""
    n = y.shape[1]
    w, idx = np.empty(n), np.empty(n, np.int64)
    for b in range(y.shape[0]):
        a = alpha[b]
        c = _positive(y[b], idx)
        wsum, gw, ent = 0.0, 0.0, 0.0
        for j in range(c):
            yi = np.float64(y[b, idx[j]])
            w[j] = math.sqrt(yi) if a == 1.5 else yi ** (2.0 - a)
            wsum += w[j]
            gw += g[b, idx[j]] * w[j]
            if need_alpha:
                ent += yi * math.log(yi)
        wsum = max(wsum, _TINY)
        q = gw / wsum
        dx[b, :] = 0
        da = 0.0
        for j in range(c):
            i = idx[j]
            dx[b, i] = (g[b, i] - q) * w[j]
            if need_alpha:
                yi = np.float64(y[b, i])
                ws = w[j] / wsum
                da += g[b, i] * (yi - ws) / (a - 1.0) ** 2 - g[b, i] * (yi * math.log(yi) - ws * ent) / (a - 1.0)
        d_alpha[b] = da


@nb.njit(**_JIT)
def normmax_backward(y, g, dx, alpha: float) -> None:
    """alpha-normmax VJP (as entmax.NormmaxBisectFunction): with b = y^(2 - alpha) on the support,
    dx = c [g b - (g.b) y - (g.y) (b - (sum b) y)],  c = (sum y^alpha)^((alpha-1)/alpha) / (alpha-1)."""
    n = y.shape[1]
    w, idx = np.empty(n), np.empty(n, np.int64)
    for b in range(y.shape[0]):
        c = _positive(y[b], idx)
        sgb, sgy, sb, sya = 0.0, 0.0, 0.0, 0.0
        for j in range(c):
            i = idx[j]
            yi = np.float64(y[b, i])
            w[j] = 1.0 if alpha == 2.0 else yi ** (2.0 - alpha)
            sgb += g[b, i] * w[j]
            sgy += g[b, i] * yi
            sb += w[j]
            sya += yi * yi if alpha == 2.0 else yi ** alpha
        scale = sya ** ((alpha - 1.0) / alpha) / (alpha - 1.0)
        dx[b, :] = 0
        for j in range(c):
            i = idx[j]
            yi = np.float64(y[b, i])
            dx[b, i] = scale * (g[b, i] * w[j] - sgb * yi - sgy * (w[j] - sb * yi))


# --------------------------------------------------------------------------------------------------
# sequential k-subsets SparseMAP: active set + budgeted-Viterbi oracle, row by row
# --------------------------------------------------------------------------------------------------
#   structures z in {0,1}^n, sum z = k, score(z) = <theta, z> + eta * sum_i z_i z_{i+1};
#   p = argmax_{p in simplex} sum_z p_z score(z) - 1/2 ||Z^T p||^2,   mu = Z^T p,
#
# solved per row by the active-set method (Niculae et al. 2018, Alg. 1) with a budgeted-Viterbi MAP
# oracle. -inf entries of theta are not selectable (0 in the scores); rows with at most k finite
# entries get mu = 1 on them (one structure, zero Jacobian). A structure is the sorted list of its k
# positions, so Gram entries <z_a, z_b> (overlaps), scores, mu and Z g cost O(k) per structure; the
# oracle reuses its DP tables up to the first entry of theta - mu that changed; M^-1 of the active
# set is kept by bordering (add) / Schur downdate (drop). When the MAP structure is an affine
# combination of the active ones (singular KKT system, possible for eta != 0 and k >= 2; a plain
# active-set solve returns NaN or stops early there) a ray step (keep mu, move weight onto the new
# structure until an old one hits 0, drop it) continues. Output weights p <= 1e-12 (rounding residue of
# structures whose exact weight is 0) are dropped, so the Jacobian uses the support exact arithmetic
# gives.
_TOL = 1e-10  # oracle improvement threshold, relative to scale = 1 + max|theta| + |eta| k
_NEG = -1e-12  # KKT weights below this are negative (drop step)
_PMIN = 1e-12  # output weights <= this are rounding residue of degenerate rows: dropped
_PIV = 1e-12  # Cholesky pivot floor (relative): below it the active Gram matrix is singular

STATUS_OK = 0
STATUS_MAX_ITER = 1
STATUS_SINGULAR = 2  # singular KKT system: the row keeps its last p
STATUS_FULL = 3  # active set exceeded its capacity (n + 2 structures)


# ------------------------------------------------------------------------------------------------
# MAP oracle
# ------------------------------------------------------------------------------------------------
@nb.njit(cache=True, inline="always")
def _viterbi_row(w, k, eta, P0, P1, R, t0, out, o):
    """out[o, :k] = sorted positions of argmax_{z in {0,1}^n, sum z = k} <w, z> + eta sum_i z_i z_{i+1}.

    Dynamic program with ties broken towards 'not selected', computed layer by layer in the count j
    (1 <= j <= k). With P1[j, t] / P0[j, t] = best score of the first t items with j selected and
    item t-1 selected / not selected:
        P1[1, t] = w[t-1],  P1[j, t] = max(P0[j-1, t-1], P1[j-1, t-1] + eta) + w[t-1],
        P0[j, t] = max_{t' < t} P1[j, t']        (running max; P[j, 0] = -inf),
    and R[j, t] = the last t' <= t with P1[j, t'] > P0[j, t'] (a strict new running max). The
    backtrack (backpointer 'previous item selected' = strict >, ties towards not
    selected) then reads: the last selected item is R[k, n] - 1; from selected item i with count
    j >= 2, item i-1 is selected iff P1[j-1, i] + eta > P0[j-1, i], else the previous selected item
    is R[j-1, i-1] - 1. -inf in w = not selectable (w needs >= k finite entries).

    Columns t <= t0 of the tables must already hold the values for w[:t0] (t0 = 0: only column 0,
    -inf / 0, which the caller writes once); columns t0+1..n are recomputed.
    P0, P1: (k+1, n+1) float64 and R: (k+1, n+1) int64 work arrays. Returns k.
    """
    n = w.shape[0]
    # unsigned loop indices: numba then emits no negative-index wraparound code (2x faster loops)
    nu = nb.uint64(n)
    one = nb.uint64(1)
    t0u = nb.uint64(t0)
    for j in range(1, k + 1):
        a = P0[j, t0u]
        b = P1[j, t0u]
        m = b if b > a else a  # max_{t' <= t0} P1[j, t']
        r = nb.uint64(R[j, t0u])
        if j == 1:
            for t in range(t0u + one, nu + one):
                x = w[t - one]
                P1[1, t] = x
                P0[1, t] = m
                if x > m:
                    m = x
                    r = t
                R[1, t] = r
        else:
            for t in range(t0u + one, nu + one):
                c = P1[j - 1, t - one] + eta
                d = P0[j - 1, t - one]
                x = (c if c > d else d) + w[t - one]
                P1[j, t] = x
                P0[j, t] = m
                if x > m:
                    m = x
                    r = t
                R[j, t] = r
    _backtrack(k, eta, P0, P1, R, R[k, n], out, o)
    return k


@nb.njit(cache=True, inline="always")
def _backtrack(k, eta, P0, P1, R, tend, out, o):
    """out[o, :k] = the structure of value P1[k, tend] (best with last selected item tend - 1),
    read from the tables of _viterbi_row with its tie-breaking (see there)."""
    i = tend - 1
    j = k
    out[o, k - 1] = i
    while j > 1:
        if P1[j - 1, i] + eta > P0[j - 1, i]:
            i = i - 1
        else:
            i = R[j - 1, i - 1] - 1
        j -= 1
        out[o, j - 1] = i


# ------------------------------------------------------------------------------------------------
# small helpers on position lists (row a of A, row b of B; no array views in the hot loops)
# ------------------------------------------------------------------------------------------------
@nb.njit(cache=True, inline="always")
def _overlap(A, a, na, Bm, b, nb):
    """<z_a, z_b> for two position lists A[a, :na], Bm[b, :nb] (distinct entries): the number of
    equal pairs, counted branch-free (na, nb <= k are small)."""
    c = 0
    for i in range(na):
        x = A[a, i]
        for j in range(nb):
            c += x == Bm[b, j]
    return c


@nb.njit(cache=True, inline="always")
def _chol_solve2(G, idx, m, r1, L, x1, x2):
    """Solve M x1 = r1, M x2 = 1 with M = G[idx[:m], idx[:m]] (SPD) by Cholesky M = L L^T.

    Returns False when a pivot is <= _PIV * max diag (singular / not positive definite).
    """
    dmax = 0.0
    for a in range(m):
        d = G[idx[a], idx[a]]
        if d > dmax:
            dmax = d
    for a in range(m):  # L[a, a] holds 1 / L_aa (one division per pivot)
        ia = idx[a]
        for b in range(a + 1):
            s = G[ia, idx[b]]
            for c in range(b):
                s -= L[a, c] * L[b, c]
            if a == b:
                if s <= _PIV * dmax:
                    return False
                L[a, a] = 1.0 / np.sqrt(s)
            else:
                L[a, b] = s * L[b, b]
    for a in range(m):  # L y = r
        s1 = r1[a]
        s2 = 1.0
        for c in range(a):
            s1 -= L[a, c] * x1[c]
            s2 -= L[a, c] * x2[c]
        x1[a] = s1 * L[a, a]
        x2[a] = s2 * L[a, a]
    for a in range(m - 1, -1, -1):  # L^T x = y
        s1 = x1[a]
        s2 = x2[a]
        for c in range(a + 1, m):
            s1 -= L[c, a] * x1[c]
            s2 -= L[c, a] * x2[c]
        x1[a] = s1 * L[a, a]
        x2[a] = s2 * L[a, a]
    return True


# ------------------------------------------------------------------------------------------------
# forward: active set over all rows
# ------------------------------------------------------------------------------------------------
@nb.njit(cache=True, inline="always")
def _kkt_solve(H, idx, m, S, s0, x1, x2):
    """x1 = M^-1 (S_A - s0), x2 = M^-1 1 on the active slots idx[:m], H = M^-1 (slot-indexed).

    The scores enter relative to s0 (one of them): p = M^-1 (S - s0) - tau' M^-1 1 with
    tau = tau' + s0 (sum p = 1 absorbs the constant), so weights of order 1 are not lost in the
    rounding of scores of order 1e16 and beyond."""
    for a in range(m):
        ia = idx[a]
        s1 = 0.0
        s2 = 0.0
        for c in range(m):
            h = H[ia, idx[c]]
            s1 += h * (S[idx[c]] - s0)
            s2 += h
        x1[a] = s1
        x2[a] = s2


@nb.njit(cache=True, inline="always")
def _inverse_add(H, idx, m, G, s, d, u):
    """Bordered inverse: H = M^-1 on the slots idx[:m]; add slot s (Gram row G[s], <z_s, z_s> = d):
        u = M^-1 v, sigma = d - v^T u,  M'^-1 = [[M^-1 + u u^T / sigma, -u / sigma], [-u^T / sigma, 1 / sigma]].
    Returns False (H unchanged) when sigma <= _PIV * d (z_s in the span of the active structures)."""
    sig = d
    for a in range(m):
        ia = idx[a]
        acc = 0.0
        for c in range(m):
            acc += H[ia, idx[c]] * G[s, idx[c]]
        u[a] = acc
        sig -= G[s, ia] * acc
    if not sig > _PIV * d:
        return False
    inv = 1.0 / sig
    for a in range(m):
        ia = idx[a]
        ua = u[a] * inv
        for c in range(m):
            H[ia, idx[c]] += ua * u[c]
        H[ia, s] = -ua
        H[s, ia] = -ua
    H[s, s] = inv
    return True


@nb.njit(cache=True, inline="always")
def _inverse_drop(H, idx, m, r):
    """Remove slot r from H = M^-1 on idx[:m]: H_{-r,-r} <- H_{-r,-r} - H_{-r,r} H_{r,-r} / H_{r,r}."""
    inv = 1.0 / H[r, r]
    for a in range(m):
        ia = idx[a]
        if ia == r:
            continue
        f = H[ia, r] * inv
        for c in range(m):
            ic = idx[c]
            if ic != r:
                H[ia, ic] -= f * H[r, ic]


@nb.njit(cache=True)
def _forward_core(theta, k, eta, max_iter):
    """Solve every row of theta (B, n) by the active-set method.

    Per row, per iteration: KKT solve on the active set A,
        min_p 1/2 p^T M p - <S_A, p>  s.t. sum p = 1:  p = M^-1 S - tau M^-1 1,
        tau = (1^T M^-1 S - 1) / (1^T M^-1 1),   M = Z_A Z_A^T (M^-1 kept up to date by bordering);
    if some p_c < -1e-12: step from the current p towards it until the first weight hits 0 and drop
    that structure; else oracle z = argmax score(z) - <z, mu> and add z if
    score(z) - <z, mu> > tau + 1e-10 * scale (scale = 1 + max|theta| + |eta| k), else stop.

    Returns mu (B, n), positions (B, C, k) of the structures with p > 0 (-1 = padding), their
    weights p (B, C) and scores (B, C), iterations (B,) and status (B,) per row.
    """
    B, n = theta.shape
    kk = max(k, 1)
    cap = n + 2
    K = k + 1
    ninf = -np.inf
    mu_out = np.zeros((B, n))
    thf = np.empty(n)
    w = np.empty(n)
    mu = np.zeros(n)
    pos = np.zeros((cap, kk), dtype=np.int64)
    S = np.zeros(cap)
    p = np.zeros(cap)
    act = np.zeros(cap, dtype=np.bool_)
    G = np.zeros((cap, cap))
    H = np.zeros((cap, cap))
    idx = np.zeros(cap, dtype=np.int64)
    x1 = np.zeros(cap)
    x2 = np.zeros(cap)
    u = np.zeros(cap)
    touched = np.zeros(2 * cap * kk, dtype=np.int64)  # positions where mu may be nonzero (old + new)
    P0 = np.empty((K, n + 1))
    P1 = np.empty((K, n + 1))
    R = np.zeros((K, n + 1), dtype=np.int64)
    for j in range(K):
        P0[j, 0] = ninf
        P1[j, 0] = ninf
        R[j, 0] = 0
    newpos = np.zeros((1, kk), dtype=np.int64)
    Cb = 8
    o_pos = np.full((B, Cb, kk), -1, dtype=np.int64)
    o_p = np.zeros((B, Cb))
    o_s = np.zeros((B, Cb))
    n_struct = np.zeros(B, dtype=np.int64)
    iters = np.zeros(B, dtype=np.int64)
    status = np.zeros(B, dtype=np.int64)
    for b in range(B):
        nfin = 0
        amax = 0.0
        for i in range(n):
            t = theta[b, i]
            w[i] = t
            if t == ninf:
                thf[i] = 0.0
            else:
                nfin += 1
                thf[i] = t
                if abs(t) > amax:
                    amax = abs(t)
        if nfin <= k:  # all finite entries selected: one structure, its score
            m = 0
            sc = 0.0
            for i in range(n):
                if theta[b, i] != ninf:
                    mu_out[b, i] = 1.0
                    o_pos[b, 0, m] = i
                    sc += theta[b, i]
                    if m > 0 and o_pos[b, 0, m - 1] == i - 1:
                        sc += eta
                    m += 1
            o_p[b, 0] = 1.0
            o_s[b, 0] = sc
            n_struct[b] = 1
            continue
        scale = 1.0 + amax + abs(eta) * k
        # ---- initial structure: MAP at theta
        _viterbi_row(w, k, eta, P0, P1, R, 0, pos, 0)
        sc = 0.0
        for t in range(k):
            sc += thf[pos[0, t]]
            if t > 0 and pos[0, t] == pos[0, t - 1] + 1:
                sc += eta
        S[0] = sc
        p[0] = 1.0
        act[0] = True
        G[0, 0] = k
        H[0, 0] = 1.0 / k
        nslots = 1
        ntouched = 0
        st = STATUS_MAX_ITER
        it = 0
        while it < max_iter:
            it += 1
            m = 0
            for c in range(nslots):
                if act[c]:
                    idx[m] = c
                    m += 1
            s0 = S[idx[0]]
            _kkt_solve(H, idx, m, S, s0, x1, x2)
            sa = 0.0
            sb = 0.0
            for a in range(m):
                sa += x1[a]
                sb += x2[a]
            tau = (sa - 1.0) / sb
            infeasible = False
            for a in range(m):
                x1[a] = x1[a] - tau * x2[a]  # x1 := KKT weights
                if x1[a] < _NEG:
                    infeasible = True
            if infeasible:
                best = np.inf
                drop = -1
                for a in range(m):
                    if x1[a] < _NEG:
                        pc = p[idx[a]]
                        den = pc - x1[a]
                        if den < 1e-300:
                            den = 1e-300
                        r = pc / den
                        if r < best:
                            best = r
                            drop = a
                step = min(max(best, 0.0), 1.0)
                for a in range(m):
                    c = idx[a]
                    v = p[c] + step * (x1[a] - p[c])
                    p[c] = v if v > 0.0 else 0.0
                r = idx[drop]
                p[r] = 0.0
                act[r] = False
                _inverse_drop(H, idx, m, r)
                continue
            for a in range(m):
                v = x1[a]
                p[idx[a]] = v if v > 0.0 else 0.0
            # mu = sum_c p_c z_c (slot order) and w = theta - mu, touching only the positions of
            # the previous and the current active structures; t0 = first changed entry of w
            for e in range(ntouched):
                mu[touched[e]] = 0.0
            nold = ntouched
            for a in range(m):
                c = idx[a]
                pc = p[c]
                for t in range(k):
                    q = pos[c, t]
                    mu[q] += pc
                    touched[ntouched] = q
                    ntouched += 1
            t0 = n
            for e in range(ntouched):
                q = touched[e]
                v = theta[b, q] - mu[q]
                if v != w[q]:
                    w[q] = v
                    if q < t0:
                        t0 = q
            for e in range(ntouched - nold):  # keep only the current positions
                touched[e] = touched[nold + e]
            ntouched -= nold
            _viterbi_row(w, k, eta, P0, P1, R, t0, newpos, 0)
            # add the MAP structure z = newpos if its reduced cost improves on tau, else optimal
            s_new = 0.0
            zmu = 0.0
            for t in range(k):
                q = newpos[0, t]
                s_new += thf[q]
                zmu += mu[q]
                if t > 0 and q == newpos[0, t - 1] + 1:
                    s_new += eta
            if not ((s_new - s0) - zmu > tau + _TOL * scale):  # tau relative to s0
                st = STATUS_OK
                break
            slot = -1
            for c in range(nslots):
                if not act[c]:
                    slot = c
                    break
            if slot < 0:
                if nslots >= cap:
                    st = STATUS_FULL
                    break
                slot = nslots
                nslots += 1
            for t in range(k):
                pos[slot, t] = newpos[0, t]
            for a in range(m):
                c = idx[a]
                o = _overlap(pos, slot, k, pos, c, k)
                G[slot, c] = o
                G[c, slot] = o
            G[slot, slot] = k
            weight = 0.0
            if not _inverse_add(H, idx, m, G, slot, float(k), u):
                # The MAP structure is an affine combination z = sum_c u_c z_c (u = M^-1 Z_A z,
                # sum u = 1) of the active ones (possible when eta != 0; a plain KKT
                # solve returns NaN here). Moving p along (e_z - u) keeps mu and raises the
                # objective at rate (reduced cost of z) - tau > 0: step until the first p_c
                # hits 0, drop c, and add z with that weight.
                weight = np.inf
                ra = -1
                for a in range(m):
                    if u[a] > 1e-12:
                        rt = p[idx[a]] / u[a]
                        if rt < weight:
                            weight = rt
                            ra = a
                if ra < 0:
                    st = STATUS_SINGULAR
                    break
                for a in range(m):
                    c = idx[a]
                    v = p[c] - weight * u[a]
                    p[c] = v if v > 0.0 else 0.0
                r = idx[ra]
                p[r] = 0.0
                act[r] = False
                _inverse_drop(H, idx, m, r)
                for a in range(ra, m - 1):
                    idx[a] = idx[a + 1]
                m -= 1
                if not _inverse_add(H, idx, m, G, slot, float(k), u):
                    st = STATUS_SINGULAR
                    break
            S[slot] = s_new
            p[slot] = weight
            act[slot] = True
        iters[b] = it
        status[b] = st
        # ---- outputs: mu from the final weights, structures with p > 0; reset the row state
        for e in range(ntouched):
            mu[touched[e]] = 0.0
        q = 0
        for c in range(nslots):
            if p[c] > _PMIN:
                q += 1
        if q > Cb:  # grow the compact buffers
            nC = max(q, 2 * Cb)
            t_pos = np.full((B, nC, kk), -1, dtype=np.int64)
            t_p = np.zeros((B, nC))
            t_s = np.zeros((B, nC))
            t_pos[:, :Cb] = o_pos
            t_p[:, :Cb] = o_p
            t_s[:, :Cb] = o_s
            o_pos, o_p, o_s = t_pos, t_p, t_s
            Cb = nC
        q = 0
        for c in range(nslots):
            pc = p[c]
            if pc > _PMIN:
                for t in range(k):
                    o_pos[b, q, t] = pos[c, t]
                    mu_out[b, pos[c, t]] += pc
                o_p[b, q] = pc
                o_s[b, q] = S[c]
                q += 1
            act[c] = False
            p[c] = 0.0
        n_struct[b] = q
    C = 1
    for b in range(B):
        if n_struct[b] > C:
            C = n_struct[b]
    return mu_out, o_pos[:, :C].copy(), o_p[:, :C].copy(), o_s[:, :C].copy(), iters, status


@nb.njit(cache=True)
def _value_kernel(mu, o_p, o_s):
    """value = sum_c p_c score(z_c) - 1/2 ||mu||^2 per row."""
    B, n = mu.shape
    C = o_p.shape[1]
    out = np.empty(B)
    for b in range(B):
        v = 0.0
        for c in range(C):
            v += o_p[b, c] * o_s[b, c]
        q = 0.0
        for i in range(n):
            q += mu[b, i] * mu[b, i]
        out[b] = v - 0.5 * q
    return out


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@nb.njit(cache=True, inline="always")
def _backward_row(pos, cnt, m, g, dx, b, G, idx, L, u, x1, x2):
    """dx_b = Z_A^T v, v = a - b (1^T a) / (1^T b), a = M^-1 Z_A g, b = M^-1 1, M = Z_A Z_A^T
    (= Z_A^T (M^-1 - M^-1 1 1^T M^-1 / (1^T M^-1 1)) Z_A g) for the m structures pos[:m]."""
    if m <= 1:
        return
    for a in range(m):
        s = 0.0
        for t in range(cnt[a]):
            s += g[b, pos[a, t]]
        u[a] = s
        G[a, a] = cnt[a]
        for c in range(a):
            o = _overlap(pos, a, cnt[a], pos, c, cnt[c])
            G[a, c] = o
            G[c, a] = o
    if not _chol_solve2(G, idx, m, u, L, x1, x2):
        return  # singular active set: no gradient (does not happen for a valid forward)
    sa = 0.0
    sb = 0.0
    for a in range(m):
        sa += x1[a]
        sb += x2[a]
    rr = sa / sb
    for a in range(m):
        v = x1[a] - x2[a] * rr
        for t in range(cnt[a]):
            dx[b, pos[a, t]] += v


@nb.njit(cache=True)
def _backward_pos_kernel(o_pos, p, g):
    """J g per row from compact structures (positions (B, C, k), -1 = padding) with p > 0."""
    B, C, kk = o_pos.shape
    n = g.shape[1]
    dx = np.zeros((B, n))
    pos = np.zeros((C, kk), dtype=np.int64)
    cnt = np.zeros(C, dtype=np.int64)
    G = np.zeros((C, C))
    idx = np.arange(C)
    L = np.zeros((C, C))
    u = np.zeros(C)
    x1 = np.zeros(C)
    x2 = np.zeros(C)
    for b in range(B):
        m = 0
        for c in range(C):
            if p[b, c] > 0.0:
                q = 0
                for t in range(kk):
                    v = o_pos[b, c, t]
                    if v >= 0:
                        pos[m, q] = v
                        q += 1
                cnt[m] = q
                m += 1
        _backward_row(pos, cnt, m, g, dx, b, G, idx, L, u, x1, x2)
    return dx


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def _as_f64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def seq_forward_info(theta: np.ndarray, k: int, eta: float, max_iter: int = 200):
    """``seq_forward`` plus per-row active-set iteration counts and status (STATUS_*)."""
    mu, pos, p, _, iters, status = _forward_core(_as_f64(theta), int(k), float(eta), int(max_iter))
    return mu, pos, p, iters, status


def seq_forward(theta: np.ndarray, k: int, eta: float, max_iter: int = 200):
    """SparseMAP marginals mu = Z^T p of the budgeted chain, per row of theta (B, n):

        p = argmax_{p in simplex} sum_z p_z score(z) - 1/2 ||Z^T p||^2,
        score(z) = <theta, z> + eta sum_i z_i z_{i+1},  z in {0,1}^n, sum z = k (-inf: never selected).

    Returns mu (B, n) float64, the structures with p > 0 as sorted positions (B, C, k) int64
    (-1 = padding) and their weights p (B, C)."""
    mu, pos, p, _, _, _ = _forward_core(_as_f64(theta), int(k), float(eta), int(max_iter))
    return mu, pos, p


def seq_backward(pos: np.ndarray, p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """J g (B, n), J = Z_A^T (M^-1 - M^-1 1 1^T M^-1 / (1^T M^-1 1)) Z_A, M = Z_A Z_A^T, A = {p > 0}."""
    return _backward_pos_kernel(np.ascontiguousarray(pos, dtype=np.int64), _as_f64(p), _as_f64(g))


def seq_value(theta: np.ndarray, k: int, eta: float, max_iter: int = 200) -> np.ndarray:
    """Optimal value sum_z p_z score(z) - 1/2 ||mu||^2 per row (B,) (-inf entries scored 0)."""
    mu, _, p, s, _, _ = _forward_core(_as_f64(theta), int(k), float(eta), int(max_iter))
    return _value_kernel(mu, p, s)


@nb.njit(cache=True)
def _map_oracle_kernel(theta, k, eta):
    B, n = theta.shape
    P0, P1 = np.empty((k + 1, n + 1)), np.empty((k + 1, n + 1))
    R = np.zeros((k + 1, n + 1), dtype=np.int64)
    P0[:, 0] = -np.inf
    P1[:, 0] = -np.inf
    out = np.zeros((B, k), dtype=np.int64)
    w = np.empty(n)
    for b in range(B):
        w[:] = theta[b]
        _viterbi_row(w, k, eta, P0, P1, R, 0, out, b)
    return out


def map_oracle(theta: np.ndarray, k: int, eta: float) -> np.ndarray:
    """The solver's MAP oracle: sorted positions (B, k) of argmax_{z in {0,1}^n, sum z = k}
    <theta, z> + eta sum_i z_i z_{i+1} per row (-inf = not selectable; >= k finite entries)."""
    return _map_oracle_kernel(_as_f64(theta), int(k), float(eta))
