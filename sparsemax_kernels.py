"""CPU kernels (numba) behind the normalization maps of ``sparsemax.py``.

Every threshold map reduces, row by row, to a 1-d root finding in tau followed by an element-wise
output. In eager PyTorch each iteration of that search is a handful of full-tensor ops, so on short
rows (n = 64) the maps were op-overhead bound at 10-40x ``torch.softmax``. Here one compiled loop
handles a row at a time with the same algorithms, stopping rules and float64 arithmetic as the torch
solvers in ``sparsemax.py`` (which stay the path for CUDA tensors and when numba is missing):

  * sparsemax, 1.5-entmax, 2-normmax, k-subsets: each solver iteration is one vectorized sweep over
    the row (count, sum, sum of squares above t), the output another; no sorting, no buffers.
  * alpha-entmax, alpha-normmax: pow() is the cost, so a pow-free root (sparsemax, quadratic, or a
    power-of-two exponent by Newton) first brackets tau from below, and the Newton iterations on
    sum [z - t]_+^p = 1 run on the entries above that bound only.
  * backward passes: one or two sweeps per row (pow only on the support).

tests/test_sparsemax.py runs every test on both paths and cross-checks them.
Conventions: inputs are C-contiguous (B, n) float32/float64 arrays, -inf = masked (weight exactly 0),
a fully masked row gives zeros, no NaN. Kernels are single-threaded (``nogil``): one trial = one core.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

_JIT = dict(cache=True, nogil=True)
# reductions may be reassociated (vectorized sums); no ninf: -inf marks masked entries
_FAST = dict(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract", "arcp"})
_MAX_MATH = dict(cache=True, nogil=True, fastmath={"nnan", "reassoc", "nsz"})  # no NaN inputs by contract
_TINY = np.finfo(np.float64).tiny
_EPS = np.finfo(np.float64).eps
_MAX_ITER = 100


# --------------------------------------------------------------------------------------------------
# per-row helpers: sweeps, candidate buffers, threshold solvers, outputs
# --------------------------------------------------------------------------------------------------
@nb.njit(**_MAX_MATH)
def _row_max(x) -> float:
    m = -np.inf
    for i in range(x.shape[0]):
        m = max(m, np.float64(x[i]))
    return m


@nb.njit(**_JIT)
def _collect_above(x, scale: float, thr: float, vals, idx) -> int:
    """vals/idx[:c] = the entries z = scale x_i > thr and their indices (branch-free); returns c."""
    c = 0
    for i in range(x.shape[0]):
        z = scale * np.float64(x[i])
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


@nb.njit(**_FAST)
def _above_stats(x, scale: float, t: float):
    """Over S = {z = scale x > t}: (|S|, sum (z - t), sum (z - t)^2), one vectorized sweep."""
    cnt, r1, r2 = 0.0, 0.0, 0.0
    for i in range(x.shape[0]):
        d = max(scale * np.float64(x[i]) - t, 0.0)
        cnt += 1.0 if d > 0 else 0.0
        r1 += d
        r2 += d * d
    return cnt, r1, r2


@nb.njit(**_JIT)
def _sparsemax_tau(x, scale: float, m: float) -> float:
    """Root of sum [z - tau]_+ = 1, z = scale x, m = max z. Michelot: tau <- (sum_S z - 1) / |S| with
    S = {z > tau}, from the lower bound m - 1; exact once S stops shrinking."""
    tau, prev = m - 1.0, -1.0
    for _ in range(x.shape[0] + 2):
        cnt, r1, _r2 = _above_stats(x, scale, tau)
        tau = tau + (r1 - 1.0) / max(cnt, 1.0)
        if cnt == prev:
            break
        prev = cnt
    return tau


@nb.njit(**_JIT)
def _quadratic_tau(x, scale: float, m: float) -> float:
    """Root of F(t) = sum [z - t]_+^2 = 1, z = scale x, m = max z, from the lower bound m - 1.

    At a lower bound t (F(t) >= 1): t' = the smaller root of the quadratic sum_S (z - t')^2 = 1 over
    S = {z > t} (t' >= t; exact when S(t') = S, else an upper bound of tau); at an upper bound: a
    Newton step (F convex: lands below tau). As ``sparsemax._quadratic_tau``."""
    lo = t = m - 1.0
    from_closed, cnt_src = False, -1.0
    for _ in range(_MAX_ITER):
        cnt, r1, r2 = _above_stats(x, scale, t)
        if from_closed and cnt == cnt_src:
            break
        n_sup = max(cnt, 1.0)
        disc = r1 * r1 - n_sup * (r2 - 1.0)
        use_closed = r2 >= 1.0 and disc >= 0
        if use_closed:
            lo = max(lo, t)
            nxt = t + (r1 - math.sqrt(disc)) / n_sup
        else:
            nxt = max(t + (r2 - 1.0) / max(2.0 * r1, _TINY), lo)
        if nxt == t:
            break
        from_closed, cnt_src, t = use_closed, cnt, nxt
    return t


@nb.njit(**_JIT)
def _power_tau(vals, idx, c: int, lo: float, hi: float, p: float):
    """Root of F(t) = sum [z - t]_+^p = 1 in [lo, hi]: Newton on G = F^(1/p) (convex, decreasing for
    p >= 1), bisection when a step leaves the bracket; |F - 1| <= 1e-13 or no representable progress.
    As ``sparsemax._power_tau``. -> (tau, count)."""
    t = lo
    for _ in range(_MAX_ITER):
        c = _keep_above(vals, idx, c, lo)
        f, s1 = 0.0, 0.0
        for j in range(c):
            d = max(vals[j] - t, 0.0)
            dp = d * d if p == 2.0 else d ** p
            f += dp
            s1 += dp / d if d > 0 else 0.0
        err = f - 1.0
        if abs(err) <= 1e-13:
            break
        g = f ** (1.0 / p)
        nxt = t + (g - 1.0) * f / max(g * s1, _TINY)
        if err >= 0 and t > lo:
            lo = t
        if err <= 0 and t < hi:
            hi = t
        bad = not (lo < nxt < hi) or not math.isfinite(nxt)
        ulps = 4 * _EPS * max(abs(hi), abs(lo), 1.0)
        if (not bad and abs(nxt - t) <= ulps) or hi - lo <= ulps:
            break
        if bad:
            nxt = 0.5 * (lo + hi)
        if nxt == t:
            break
        t = nxt
    return t, c


@nb.njit(**_JIT)
def _write_normalized(out, vals, idx, c: int, tau: float, power: float) -> None:
    """out = 0 except out[idx_j] = r_j^power / sum_j r_j^power, r = [vals - tau]_+ (power 1 and 2
    without pow)."""
    out[:] = 0
    total = 0.0
    for j in range(c):
        d = vals[j] - tau
        if d > 0:
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
@nb.njit(**_FAST)
def _write_dense(x, out, scale: float, tau: float, power: int, normalize: bool) -> None:
    """out = r^power (/ sum r^power if normalize), r = [scale x - tau]_+ (power 1 or 2)."""
    total = 1.0
    if normalize:
        total = 0.0
        for i in range(x.shape[0]):
            d = max(scale * np.float64(x[i]) - tau, 0.0)
            total += d if power == 1 else d * d
        total = max(total, 1e-300)
    for i in range(x.shape[0]):
        d = max(scale * np.float64(x[i]) - tau, 0.0)
        out[i] = (d if power == 1 else d * d) / total


@nb.njit(**_JIT)
def sparsemax_forward(x, y) -> None:
    """y = [x - tau]_+ with sum y = 1."""
    for b in range(x.shape[0]):
        m = _row_max(x[b])
        if m == -np.inf:
            y[b, :] = 0
            continue
        _write_dense(x[b], y[b], 1.0, _sparsemax_tau(x[b], 1.0, m), 1, False)


@nb.njit(**_JIT)
def quadratic_forward(x, y, scale: float, power: int) -> None:
    """r = [scale x - tau]_+ with sum r^2 = 1; y = r^power / sum r^power.

    1.5-entmax: scale 1/2, power 2; 2-normmax: scale 1, power 1."""
    for b in range(x.shape[0]):
        m = scale * _row_max(x[b])
        if m == -np.inf:
            y[b, :] = 0
            continue
        _write_dense(x[b], y[b], scale, _quadratic_tau(x[b], scale, m), power, True)


@nb.njit(**_FAST)
def _dyadic_stats(x, scale: float, t: float, j: int):
    """(sum r^q, sum r^(q-1)), r = [scale x - t]_+, q = 2^j (powers by squaring), vectorized."""
    f, s1 = 0.0, 0.0
    for i in range(x.shape[0]):
        r = max(scale * np.float64(x[i]) - t, 0.0)
        rq = r
        for _ in range(j):
            rq = rq * rq
        f += rq
        s1 += rq / r if r > 0 else 0.0
    return f, s1


@nb.njit(**_JIT)
def _dyadic_lower_bound(x, scale: float, m: float, j: int) -> float:
    """A lower bound of the root of sum [z - t]_+^q = 1, q = 2^j: Newton on G = F^(1/q) (convex,
    decreasing) from m - 1; its iterates increase towards the root from below, so any of them is a
    lower bound. Stops at F <= 1 + 1e-6 (pow-free: q-th roots by repeated sqrt)."""
    t = m - 1.0
    for _ in range(_MAX_ITER):
        f, s1 = _dyadic_stats(x, scale, t, j)
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
def _power_bracket(x, s: float, m: float, p: float):
    """[lo, hi] around the root of sum [z - t]_+^p = 1 (z = s x, max m). hi = m - n^(-1/p); lo from a
    pow-free root: all r = z - t <= 1 for t >= m - 1, so r^p >= r^q for q >= p, and the root for
    exponent q (sparsemax q = 1; quadratic q = 2; q = 4, 8, ..., 64 by Newton) is a lower bound."""
    lo, hi = m - 1.0, m - (1.0 / x.shape[0]) ** (1.0 / p)
    if p <= 1.0:
        lo = _sparsemax_tau(x, s, m)
    elif p <= 2.0:
        lo = _quadratic_tau(x, s, m)
    elif p <= 64.0:
        lo = _dyadic_lower_bound(x, s, m, int(math.ceil(math.log2(p))))
    return min(lo - (abs(lo) + 1.0) * 1e-12, hi), hi


@nb.njit(**_JIT)
def power_forward(x, y, scale, p, out_power) -> None:
    """r = [scale_b x - tau]_+ with sum r^(p_b) = 1; y = r^(out_b) / sum r^(out_b), per-row arrays
    scale, p, out_power (B,).

    alpha-entmax: scale = alpha - 1, p = out = 1/(alpha - 1); alpha-normmax: scale 1,
    p = alpha/(alpha - 1), out = 1/(alpha - 1). Newton runs on the entries above the bracket's
    lower end only (the pow calls are the cost)."""
    n = x.shape[1]
    vals, idx = np.empty(n), np.empty(n, np.int64)
    for b in range(x.shape[0]):
        s = scale[b]
        m = s * _row_max(x[b])
        if m == -np.inf:
            y[b, :] = 0
            continue
        lo, hi = _power_bracket(x[b], s, m, p[b])
        c = _collect_above(x[b], s, lo, vals, idx)
        tau, c = _power_tau(vals, idx, c, lo, hi, p[b])
        _write_normalized(y[b], vals, idx, c, tau, out_power[b])


@nb.njit(**_FAST)
def _clip_stats(x, t: float):
    """(sum clip(x - t, 0, 1), #{0 < x - t < 1}), one vectorized sweep."""
    f, na = 0.0, 0.0
    for i in range(x.shape[0]):
        d = np.float64(x[i]) - t
        f += min(max(d, 0.0), 1.0)
        na += 1.0 if 0.0 < d < 1.0 else 0.0
    return f, na


@nb.njit(**_FAST)
def _count_finite(x) -> float:
    c = 0.0
    for i in range(x.shape[0]):
        c += 1.0 if x[i] > -np.inf else 0.0
    return c


@nb.njit(**_JIT)
def _top_value(row, k: int, top) -> float:
    """The k-th largest entry of row (k <= len(top) <= #finite), by insertion into the sorted top."""
    filled = 0
    for i in range(row.shape[0]):
        z = np.float64(row[i])
        if filled == k and z <= top[k - 1]:
            continue
        j = min(filled, k - 1)
        while j > 0 and top[j - 1] < z:
            top[j] = top[j - 1]
            j -= 1
        top[j] = z
        filled = min(filled + 1, k)
    return top[k - 1]


@nb.njit(**_JIT)
def k_subsets_forward(x, mu, k: float) -> None:
    """mu = clip(x - tau, 0, 1) with sum mu = k (rows with more than k finite entries; others get
    mu = 1 on their finite entries). tau: Newton on the piecewise-linear, decreasing
    F(t) = sum clip(x - t, 0, 1) inside the bracket [x_(ceil k) - 1, max] (F >= k resp. 0 there),
    bisecting when a step leaves it; a step that stays on its linear piece lands on the root.
    As ``sparsemax._budget_tau``."""
    tol = 4e-13 * max(k, 1.0)
    top = np.empty(int(math.ceil(k)))
    for b in range(x.shape[0]):
        row, out = x[b], mu[b]
        if _count_finite(row) <= k:
            for i in range(row.shape[0]):
                out[i] = 1.0 if row[i] > -np.inf else 0.0
            continue
        lo, hi = _top_value(row, top.shape[0], top) - 1.0, _row_max(row)
        t = lo
        for _ in range(_MAX_ITER):
            f, na = _clip_stats(row, t)
            gap = f - k
            if abs(gap) <= tol:
                break
            if gap >= 0:
                lo = max(lo, t)
            if gap <= 0:
                hi = min(hi, t)
            nxt = t + gap / na if na > 0 else 0.5 * (lo + hi)
            if not (lo < nxt < hi):
                nxt = 0.5 * (lo + hi)
            if nxt == t:
                break
            t = nxt
        for i in range(row.shape[0]):
            out[i] = min(max(np.float64(row[i]) - t, 0.0), 1.0)


# --------------------------------------------------------------------------------------------------
# backward kernels (vector-Jacobian products): y, g (B, n) -> dx (B, n)
# --------------------------------------------------------------------------------------------------
@nb.njit(**_FAST)
def support_mean_backward(y, g, dx, lower: float, upper: float) -> None:
    """dx = s * (g - mean_{s} g), s = 1[lower < y < upper]: the Jacobian diag(s) - s s^T / |s| of
    sparsemax (s = 1[y > 0]) and of the k-subsets projection (s = 1[0 < mu < 1])."""
    for b in range(y.shape[0]):
        tot, cnt = 0.0, 0.0
        for i in range(y.shape[1]):
            s = lower < y[b, i] < upper
            tot += g[b, i] if s else 0.0
            cnt += 1.0 if s else 0.0
        v = tot / max(cnt, 1.0)
        for i in range(y.shape[1]):
            dx[b, i] = g[b, i] - v if lower < y[b, i] < upper else 0.0


@nb.njit(**_FAST)
def entmax15_backward(y, g, dx) -> None:
    """1.5-entmax VJP: w = sqrt(y), dx = (g - (sum g w) / sum w) w (vectorized)."""
    for b in range(y.shape[0]):
        wsum, gw = 0.0, 0.0
        for i in range(y.shape[1]):
            w = math.sqrt(np.float64(y[b, i]))
            wsum += w
            gw += g[b, i] * w
        q = gw / max(wsum, _TINY)
        for i in range(y.shape[1]):
            dx[b, i] = (g[b, i] - q) * math.sqrt(np.float64(y[b, i]))


@nb.njit(**_FAST)
def normmax2_backward(y, g, dx) -> None:
    """2-normmax VJP: ``normmax_backward`` with alpha = 2 (b = 1[y > 0]), vectorized."""
    for b in range(y.shape[0]):
        sgb, sgy, sb, syy = 0.0, 0.0, 0.0, 0.0
        for i in range(y.shape[1]):
            yi = np.float64(y[b, i])
            bi = 1.0 if yi > 0 else 0.0
            sgb += g[b, i] * bi
            sgy += g[b, i] * yi
            sb += bi
            syy += yi * yi
        scale = math.sqrt(syy)
        for i in range(y.shape[1]):
            yi = np.float64(y[b, i])
            bi = 1.0 if yi > 0 else 0.0
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
