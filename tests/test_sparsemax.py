"""Tests of sparsemax.py against independent references.

References: sorting closed form (sparsemax), float64 bisection on the threshold (entmax, normmax,
k-subsets), SLSQP on the defining optimization problems (entmax, normmax), brute force over all
structures + a generic QP solver (k-subsets, sequential k-subsets SparseMAP), autograd.gradcheck in
float64, masks, fully masked rows, extreme scales, float32.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import sparsemax as S

torch.set_num_threads(1)

TORCH_INTERNALS = pytest.mark.torch_internals  # tests of the torch solvers' internals (not the kernels)


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def map_path(request, monkeypatch):
    """Every test runs on both CPU implementations: the numba kernels (sparsemax_kernels.py) and the
    torch code (the CUDA path); tests of the torch internals only on the latter."""
    if request.param == "kernels":
        if S._K is None:
            pytest.skip("numba not installed")
        if request.node.get_closest_marker("torch_internals"):
            pytest.skip("tests the torch solver's internals")
    monkeypatch.setattr(S, "CPU_KERNELS", request.param == "kernels")
    return request.param


def rand(*shape, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# --------------------------------------------------------------------------------------------------
# independent references (numpy / float64)
# --------------------------------------------------------------------------------------------------
def ref_sparsemax(x: np.ndarray) -> np.ndarray:
    """Sorting closed form (Martins & Astudillo 2016, Alg. 1), row by row."""
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        zs = np.sort(row)[::-1]
        cs = np.cumsum(zs)
        ks = np.arange(1, len(row) + 1)
        kmax = ks[1 + ks * zs > cs].max()
        tau = (cs[kmax - 1] - 1) / kmax
        out[i] = np.maximum(row - tau, 0)
    return out


def bisect_tau(fun, lo, hi, iters=200):
    """Root of a decreasing function by bisection."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fun(mid) >= 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def ref_entmax(x: np.ndarray, alpha: float) -> np.ndarray:
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        z = (alpha - 1) * row
        p = 1 / (alpha - 1)
        tau = bisect_tau(lambda t: (np.maximum(z - t, 0) ** p).sum() - 1, z.max() - 1, z.max())
        y = np.maximum(z - tau, 0) ** p
        out[i] = y / y.sum()
    return out


def ref_normmax(x: np.ndarray, alpha: float) -> np.ndarray:
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        q = alpha / (alpha - 1)
        tau = bisect_tau(lambda t: (np.maximum(row - t, 0) ** q).sum() - 1, row.max() - 1, row.max())
        y = np.maximum(row - tau, 0) ** (1 / (alpha - 1))
        out[i] = y / y.sum()
    return out


def ref_budget(x: np.ndarray, k: float) -> np.ndarray:
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        tau = bisect_tau(lambda t: np.clip(row - t, 0, 1).sum() - k, row.min() - 1, row.max())
        out[i] = np.clip(row - tau, 0, 1)
    return out


def slsqp_simplex(objective, n, x0=None):
    """argmin of a smooth objective over the probability simplex (high-precision SLSQP)."""
    x0 = np.full(n, 1.0 / n) if x0 is None else x0
    res = minimize(objective, x0, method="SLSQP", bounds=[(0, 1)] * n,
                   constraints=[{"type": "eq", "fun": lambda y: y.sum() - 1}],
                   options=dict(ftol=1e-15, maxiter=2000))
    return res.x


def structures(n: int, k: int) -> np.ndarray:
    """All binary vectors of length n with k ones, (C(n,k), n)."""
    rows = []
    for comb in itertools.combinations(range(n), k):
        z = np.zeros(n)
        z[list(comb)] = 1
        rows.append(z)
    return np.array(rows)


def ref_sparsemap(theta: np.ndarray, Z: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """SparseMAP by brute force: min_{p in simplex} 1/2 ||Z^T p||^2 - <Z theta + extra, p>, mu = Z^T p.

    Solved with SLSQP over the convex-combination weights of *all* structures, then polished by an
    exact KKT solve on the support found (so the reference is accurate to ~1e-10)."""
    s = Z @ theta + extra
    G = Z @ Z.T
    obj = lambda p: 0.5 * p @ G @ p - s @ p  # noqa: E731
    jac = lambda p: G @ p - s  # noqa: E731
    m = len(s)
    res = minimize(obj, np.full(m, 1.0 / m), jac=jac, method="SLSQP", bounds=[(0, None)] * m,
                   constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1, "jac": lambda p: np.ones(m)}],
                   options=dict(ftol=1e-14, maxiter=1000))
    mu = Z.T @ res.x
    # polish: the optimal mu is unique; re-solve the KKT system on the structures that are optimal
    # for the linearization (ties within 1e-6), least squares on the affine hull.
    grad = s - Z @ mu
    act = np.where(grad >= grad.max() - 1e-6)[0]
    Za = Z[act]
    A = np.block([[Za @ Za.T, np.ones((len(act), 1))], [np.ones((1, len(act))), np.zeros((1, 1))]])
    b = np.concatenate([s[act], [1.0]])
    sol = np.linalg.lstsq(A, b, rcond=None)[0]
    p = sol[:-1]
    if (p >= -1e-9).all():
        mu_polished = Za.T @ p
        if np.abs(mu_polished - mu).max() < 1e-4:
            mu = mu_polished
    return mu


def assert_sparsemap_optimal(mu: np.ndarray, theta: np.ndarray, Z: np.ndarray, extra: np.ndarray):
    """Exact optimality certificate by enumeration: mu is the SparseMAP solution iff mu lies in the
    convex hull of the structures maximizing the linearization s(z) - <z, mu> (first-order condition
    of the strongly convex problem in mu). Checked with NNLS on [Z_T; 1] p = [mu; 1]."""
    from scipy.optimize import nnls
    val = Z @ theta + extra - Z @ mu
    T = Z[val >= val.max() - 1e-7 * (1 + np.abs(extra).max())]
    A = np.vstack([T.T, np.ones((1, len(T)))])
    _, resid = nnls(A, np.concatenate([mu, [1.0]]))
    assert resid < 1e-7, resid


def chain_pairs(Z: np.ndarray) -> np.ndarray:
    return (Z[:, 1:] * Z[:, :-1]).sum(1)


# --------------------------------------------------------------------------------------------------
# values against references
# --------------------------------------------------------------------------------------------------
SCALES = [0.1, 1.0, 10.0]


@pytest.mark.parametrize("scale", SCALES + [1e3])
def test_sparsemax_matches_sorting_closed_form(scale):
    x = rand(50, 37, scale=scale, seed=1)
    torch.testing.assert_close(S.sparsemax(x), torch.from_numpy(ref_sparsemax(x.numpy())), atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alpha", [1.1, 1.5, 1.75, 2.0, 2.5])
def test_entmax_matches_bisection(alpha, scale):
    x = rand(20, 23, scale=scale, seed=2)
    expect = torch.from_numpy(ref_entmax(x.numpy(), alpha))
    torch.testing.assert_close(S.entmax(x, alpha), expect, atol=1e-9, rtol=0)
    alpha_t = torch.full((20, 1), alpha, dtype=torch.float64)
    torch.testing.assert_close(S.entmax(x, alpha_t), expect, atol=1e-9, rtol=0)
    if alpha == 1.5:
        torch.testing.assert_close(S.entmax15(x), expect, atol=1e-10, rtol=0)


def test_entmax_alpha_one_is_softmax_and_per_row_alpha():
    x = rand(6, 9, seed=3)
    torch.testing.assert_close(S.entmax(x, 1.0), torch.softmax(x, -1))
    alpha = torch.tensor([1.2, 1.5, 1.9, 2.0, 1.01, 3.0], dtype=torch.float64).view(6, 1)
    y = S.entmax(x, alpha)
    for i in range(6):
        torch.testing.assert_close(y[i], torch.from_numpy(ref_entmax(x[i:i + 1].numpy(), alpha[i].item()))[0],
                                   atol=1e-8, rtol=0)
    # a per-row tensor alpha of exactly 1 is softmax on that row (and still differentiable in x)
    alpha[2] = 1.0
    xx = x.clone().requires_grad_(True)
    y = S.entmax(xx, alpha)
    torch.testing.assert_close(y[2], torch.softmax(x[2], -1))
    torch.testing.assert_close(y[0], S.entmax(x[:1], alpha[:1])[0])
    y.sum().backward()
    assert torch.isfinite(xx.grad).all()
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        S.entmax(x, torch.full((6, 1), 0.9, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0])
def test_entmax_and_normmax_solve_their_optimization_problems(alpha):
    """Independent of the threshold equations: SLSQP on max <x,y> - Omega(y) over the simplex."""
    x = rand(3, 6, scale=1.5, seed=4).numpy()
    for row in x:
        tsallis = lambda y: -(row @ y) + (np.sum(np.abs(y) ** alpha) - 1) / (alpha * (alpha - 1))  # noqa: E731
        norm = lambda y: -(row @ y) + np.sum(np.abs(y) ** alpha) ** (1 / alpha)  # noqa: E731
        y_ent = S.entmax(torch.from_numpy(row), alpha).numpy()
        y_nm = S.normmax(torch.from_numpy(row), alpha).numpy()
        np.testing.assert_allclose(y_ent, slsqp_simplex(tsallis, 6, y_ent), atol=2e-5)
        np.testing.assert_allclose(y_nm, slsqp_simplex(norm, 6, y_nm), atol=2e-5)
        # the optimum is not beaten by random simplex points
        rng = np.random.default_rng(0)
        for _ in range(200):
            v = rng.dirichlet(np.ones(6) * 0.3)
            assert tsallis(y_ent) <= tsallis(v) + 1e-12
            assert norm(y_nm) <= norm(v) + 1e-12


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alpha", [1.2, 2.0, 3.0, 5.0])
def test_normmax_matches_bisection(alpha, scale):
    x = rand(20, 17, scale=scale, seed=5)
    torch.testing.assert_close(S.normmax(x, alpha), torch.from_numpy(ref_normmax(x.numpy(), alpha)),
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_k_subsets_matches_bisection_and_brute_force(k, scale):
    x = rand(20, 9, scale=scale, seed=6)
    mu = S.k_subsets(x, k, normalize=False)
    torch.testing.assert_close(mu, torch.from_numpy(ref_budget(x.numpy(), k)), atol=1e-9, rtol=0)
    torch.testing.assert_close(S.k_subsets(x, k), mu / k)
    Z = structures(9, k)
    for i in range(2):  # brute force SparseMAP over all k-subsets
        assert_sparsemap_optimal(mu[i].numpy(), x[i].numpy(), Z, np.zeros(len(Z)))
        np.testing.assert_allclose(mu[i].numpy(), ref_sparsemap(x[i].numpy(), Z, np.zeros(len(Z))), atol=1e-4)


@pytest.mark.parametrize("transition", [0.0, 0.7, 3.0, S.SEQUENTIAL_TRANSITION_DEFAULT])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sequential_k_subsets_matches_brute_force(k, transition):
    n = 6
    x = rand(4, n, scale=2.0, seed=7 + k)
    mu = S.sequential_k_subsets(x, k, transition=transition, normalize=False)
    Z = structures(n, k)
    for i in range(x.shape[0]):
        extra = transition * chain_pairs(Z)
        assert_sparsemap_optimal(mu[i].numpy(), x[i].numpy(), Z, extra)
        np.testing.assert_allclose(mu[i].numpy(), ref_sparsemap(x[i].numpy(), Z, extra), atol=1e-4)
    torch.testing.assert_close(S.sequential_k_subsets(x, k, transition=transition), mu / k)


def test_optimality_certificate_rejects_wrong_marginals():
    x = rand(1, 6, scale=2.0, seed=30)
    Z = structures(6, 2)
    extra = 0.7 * chain_pairs(Z)
    mu = S.sequential_k_subsets(x, 2, transition=0.7, normalize=False)[0].numpy()
    assert_sparsemap_optimal(mu, x[0].numpy(), Z, extra)
    wrong = S.k_subsets(x, 2, normalize=False)[0].numpy()  # ignores the transition bonus
    with pytest.raises(AssertionError):
        assert_sparsemap_optimal(wrong, x[0].numpy(), Z, extra)
    with pytest.raises(AssertionError):
        assert_sparsemap_optimal(0.98 * mu + 0.02 * Z[0], x[0].numpy(), Z, extra)


def test_budgeted_viterbi_oracle_by_enumeration():
    """The MAP oracle of sequential_k_subsets: argmax over all k-subsets (ties and masks included)."""
    g = torch.Generator().manual_seed(40)
    n = 7
    for trial in range(60):
        k = 1 + trial % 4
        th = torch.randn(3, n, generator=g, dtype=torch.float64)
        if trial % 3 == 0:
            th[0, 2] = float("-inf")
        if trial % 5 == 0:
            th = th.round()  # many ties
        eta = 2.0 * torch.rand(1, generator=g).item()
        positions = torch.from_numpy(S._K.map_oracle(th.numpy(), k, eta))
        z = torch.zeros(3, n, dtype=torch.float64).scatter_(1, positions, 1.0)
        assert (z.sum(1) == k).all()
        for b in range(3):
            best = max(th[b, list(c)].sum().item() + eta * sum(1 for a in c if a + 1 in c)
                       for c in itertools.combinations(range(n), k))
            sel = z[b].bool()
            got = th[b, sel].sum().item() + eta * (z[b, 1:] * z[b, :-1]).sum().item()
            assert abs(got - best) < 1e-9


def test_sequential_without_transition_equals_k_subsets():
    x = rand(30, 12, scale=3.0, seed=11)
    torch.testing.assert_close(S.sequential_k_subsets(x, 3, transition=0.0), S.k_subsets(x, 3), atol=1e-9, rtol=0)


def test_sequential_transition_favours_contiguous_selection():
    x = torch.tensor([[3.0, -3.0, 2.5, 2.4, -3.0, -3.0]], dtype=torch.float64)
    no_bonus = S.sequential_k_subsets(x, 2, transition=0.0, normalize=False)
    bonus = S.sequential_k_subsets(x, 2, transition=100.0, normalize=False)
    assert no_bonus[0, 0] > 0.5  # the two best items are not adjacent
    torch.testing.assert_close(bonus, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# structure of the outputs
# --------------------------------------------------------------------------------------------------
ALL_MAPS = {
    "softmax": lambda x: S.softmax(x),
    "sparsemax": lambda x: S.sparsemax(x),
    "entmax15": lambda x: S.entmax15(x),
    "entmax_1.3": lambda x: S.entmax(x, 1.3),
    "entmax_2.5": lambda x: S.entmax(x, 2.5),
    "normmax_2": lambda x: S.normmax(x, 2.0),
    "normmax_3": lambda x: S.normmax(x, 3.0),
    "k_subsets_3": lambda x: S.k_subsets(x, 3),
    "sequential_3": lambda x: S.sequential_k_subsets(x, 3, transition=0.5),
}


@pytest.mark.parametrize("name", list(ALL_MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_on_simplex_any_dim_and_dtype(name, dtype):
    f = ALL_MAPS[name]
    x = rand(4, 10, 6, scale=2.0, seed=12, dtype=dtype)
    y = f(x)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (y >= 0).all() and (y <= 1 + tol).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(4, 10, dtype=dtype), atol=tol, rtol=0)
    # dim argument: normalizing dim 1 equals transposing
    fd = {"softmax": S.softmax, "sparsemax": S.sparsemax, "entmax15": S.entmax15}.get(name)
    y1 = (lambda z: f(z.transpose(1, 2)).transpose(1, 2))(x)
    if fd is not None:
        torch.testing.assert_close(fd(x, dim=1), y1)
    # float32 agrees with float64
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), f(x.double()), atol=2e-5, rtol=0)


def test_dim_argument_for_every_map():
    x = rand(3, 8, 5, scale=2.0, seed=13)
    pairs = [(S.entmax(x, 1.3, dim=1), S.entmax(x.transpose(1, 2), 1.3).transpose(1, 2)),
             (S.normmax(x, 3.0, dim=1), S.normmax(x.transpose(1, 2), 3.0).transpose(1, 2)),
             (S.k_subsets(x, 2, dim=1), S.k_subsets(x.transpose(1, 2), 2).transpose(1, 2)),
             (S.sequential_k_subsets(x, 2, dim=1, transition=1.0),
              S.sequential_k_subsets(x.transpose(1, 2), 2, transition=1.0).transpose(1, 2))]
    for a, b in pairs:
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", list(ALL_MAPS))
def test_masks_and_fully_masked_rows(name):
    f = ALL_MAPS[name]
    x = rand(5, 9, scale=2.0, seed=14)
    mask = torch.zeros(5, 9, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, :] = True  # fully masked row
    mask[2, 3:] = True
    xm = x.masked_fill(mask, float("-inf")).requires_grad_(True)
    y = f(xm)
    assert torch.isfinite(y).all()
    assert (y[mask] == 0).all()
    assert (y[1] == 0).all()
    torch.testing.assert_close(y[[0, 2, 3, 4]].sum(-1), torch.ones(4, dtype=y.dtype))
    # a masked row equals the map on the unmasked entries only
    torch.testing.assert_close(y[2, :3], f(x[2:3, :3])[0])
    (y * rand(5, 9, seed=15)).sum().backward()
    assert torch.isfinite(xm.grad).all()
    assert (xm.grad[mask] == 0).all()


@pytest.mark.parametrize("name", list(ALL_MAPS))
def test_extreme_scales(name):
    f = ALL_MAPS[name]
    for scale, dtype in [(1e4, torch.float64), (1e-6, torch.float64), (1e3, torch.float32), (1e-4, torch.float32)]:
        x = rand(4, 8, scale=scale, seed=16, dtype=dtype)
        y = f(x)
        assert torch.isfinite(y).all(), (scale, dtype)
        torch.testing.assert_close(y.sum(-1), torch.ones(4, dtype=dtype), atol=1e-5, rtol=0)
    # huge scores: a single winner (or k winners) for the sparse maps
    x = torch.tensor([[0.0, 5e3, 1.0, -2e3]], dtype=torch.float64)
    if name not in ("softmax",) and not name.startswith(("k_subsets", "sequential")):
        torch.testing.assert_close(f(x), torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))


def test_sparsemax_float32_large_problem_matches_reference():
    x = rand(64, 1000, scale=1.0, seed=17, dtype=torch.float32)
    torch.testing.assert_close(S.sparsemax(x).double(), torch.from_numpy(ref_sparsemax(x.double().numpy())),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(S.entmax15(x).double(), torch.from_numpy(ref_entmax(x.double().numpy(), 1.5)),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ALL_MAPS))
def test_gradcheck_x(name):
    f = ALL_MAPS[name]
    x = rand(4, 7, scale=1.5, seed=18).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_x_with_mask():
    x = rand(3, 7, scale=1.5, seed=19)
    x[0, 2] = float("-inf")
    x = x.requires_grad_(True)
    for f in ALL_MAPS.values():
        # finite differences never touch the -inf entry (its gradient is exactly 0)
        y = f(x)
        g = rand(3, 7, seed=20)
        (grad,) = torch.autograd.grad((y * g).sum(), x)
        assert grad[0, 2] == 0
        assert torch.autograd.gradcheck(lambda z: f(torch.cat([z[:, :2], x[:, 2:3].detach(), z[:, 3:]], 1)),
                                        (x.detach().masked_fill(torch.isinf(x), 0.0).requires_grad_(True),),
                                        eps=1e-6, atol=1e-6)


def test_own_entmax15_solver_on_short_rows():
    """Short rows (no block bound, dense loop) of our own 1.5-entmax solver against the reference."""
    x = rand(30, 11, scale=2.0, seed=31)
    torch.testing.assert_close(S.entmax15(x), S._Entmax15.apply(x), atol=0, rtol=0)
    torch.testing.assert_close(S._Entmax15.apply(x), torch.from_numpy(ref_entmax(x.numpy(), 1.5)), atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(S._Entmax15.apply, (x[:4].clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


@TORCH_INTERNALS
def test_compact_candidate_path_equals_dense_path(monkeypatch):
    """Long rows iterate only on the entries above max - 1 and store outputs/gradients on the
    support; compare values and vector-Jacobian products (x and alpha) with the dense path."""
    x = rand(48, 1000, scale=3.0, seed=32)
    x[3, 10:] = float("-inf")
    x[5] = float("-inf")
    g = rand(48, 1000, seed=33)
    alpha = torch.linspace(1.1, 1.9, 48, dtype=torch.float64).view(48, 1)
    fns = {"sparsemax": lambda z, a: S.sparsemax(z), "entmax15": lambda z, a: S._Entmax15.apply(z),
           "entmax_alpha": lambda z, a: S.entmax(z, a), "normmax2": lambda z, a: S.normmax(z, 2.0),
           "normmax3": lambda z, a: S.normmax(z, 3.0), "k_subsets1": lambda z, a: S.k_subsets(z, 1),
           "k_subsets2": lambda z, a: S.k_subsets(z / 3.0, 2),
           "k_subsets3": lambda z, a: S.k_subsets(z, 3)}
    used = []
    orig = S._CompactRows.__init__

    def spy(self, *args, **kw):
        used.append(1)
        orig(self, *args, **kw)

    monkeypatch.setattr(S._CompactRows, "__init__", spy)

    def run(fn):
        xx, aa = x.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
        y = fn(xx, aa)
        gx, ga = torch.autograd.grad((y * g).sum(), (xx, aa), allow_unused=True)
        return y, gx, ga

    for name, fn in fns.items():
        used.clear()
        y_c, gx_c, ga_c = run(fn)
        assert used, name  # the compact path was taken
        with monkeypatch.context() as mp:
            mp.setattr(S, "_COMPACT_MIN_SIZE", 1 << 40)
            y_d, gx_d, ga_d = run(fn)
        torch.testing.assert_close(y_c, y_d, atol=1e-12, rtol=0)
        torch.testing.assert_close(gx_c, gx_d, atol=1e-10, rtol=0)
        if ga_d is not None:
            torch.testing.assert_close(ga_c, ga_d, atol=1e-10, rtol=0)
        assert (y_c[5] == 0).all() and (y_c[3, 10:] == 0).all()


@TORCH_INTERNALS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_candidate_scan_equals_full_scan(dtype):
    """_candidates_in_blocks (scans only blocks whose max exceeds the threshold; rows of 1000 = 15
    blocks of 62 + a last block of 70) must find exactly the entries z > thr of a full scan."""
    z = rand(40, 1000, scale=2.0, seed=40, dtype=dtype)
    z[2, 500:] = float("-inf")
    z[7] = 0.0  # a constant row: every block selected
    bm = S._block_max(z)
    assert bm.shape == (40, S._BLOCKS)
    torch.testing.assert_close(bm.amax(-1), z.amax(-1), atol=0, rtol=0)
    assert S._candidates_in_blocks(z, torch.full((40, 1), float("-inf"), dtype=dtype), bm) is None  # all
    thr = (z.amax(-1, keepdim=True) - 0.5 * rand(40, 1, seed=41).abs()).to(dtype)
    thr[7] = -1.0
    thr[9] = z[9].max() - 1e-3  # only the max itself
    vals, cols = S._candidates_in_blocks(z, thr, bm)
    assert vals.dtype == torch.float64 and vals.shape == cols.shape
    for i in range(40):
        want = (z[i] > thr[i]).nonzero().squeeze(1)
        got = cols[i][torch.isfinite(vals[i])]
        assert torch.equal(got.sort().values, want), i
        torch.testing.assert_close(vals[i][torch.isfinite(vals[i])], z[i, got].double(), atol=0, rtol=0)


@TORCH_INTERNALS
def test_subset_bounds_are_lower_bounds():
    """The root over the block maxima never exceeds the exact threshold (F_sub <= F), for every solver."""
    x = rand(64, 1000, scale=2.0, seed=42)
    x[1, 20:] = float("-inf")
    m = x.amax(-1, keepdim=True)
    p = torch.linspace(1.2, 9.0, 64, dtype=torch.float64).view(64, 1)
    cases = {
        "sparsemax": (lambda z, zm, d: S._sparsemax_tau(z, zm, dense=d)[0], 1),
        "quadratic/2": (lambda z, zm, d: S._quadratic_tau(z, zm, 0.5, dense=d)[0], 1),
        "power": (lambda z, zm, d: S._power_tau(z, zm, p, 1.0 / (p - 1.0), dense=d)[0], 1),
        "budget3": (lambda z, zm, d: S._budget_tau(z, zm, 3.0, dense=d)[0], 4),
    }
    for name, (solve, need) in cases.items():
        lb, bm = S._subset_bound(x, lambda s, sm: solve(s, sm, True), need)
        tau = solve(x, m, True)
        assert bm is not None and torch.isfinite(lb[2:]).all(), name  # row 1: finite entries in one block
        assert (lb <= tau).all(), name
        assert (lb[2:] >= tau[2:] - 1.0).all(), name  # close: within 1 of tau


def test_k_subsets_rows_with_a_far_outlier():
    """Rows where F(max - 2) < k (one entry far above the rest) take the x_(k) - 1 lower bound."""
    x = rand(64, 600, scale=0.01, seed=43)
    x[::3, 5] = 10.0
    for k in (1, 3):
        mu = S.k_subsets(x, k, normalize=False)
        torch.testing.assert_close(mu, torch.from_numpy(ref_budget(x.numpy(), k)), atol=1e-9, rtol=0)


def test_gradcheck_alpha_entmax():
    x = rand(4, 6, scale=1.5, seed=21).requires_grad_(True)
    alpha = torch.tensor([1.2, 1.5, 1.8, 2.3], dtype=torch.float64).view(4, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: S.entmax(a, b), (x, alpha), eps=1e-6, atol=1e-6)
    # per-head alpha broadcast over a 4-d score tensor, normalized over the last dim
    scores = rand(2, 3, 2, 5, seed=22).requires_grad_(True)
    alpha_h = torch.tensor([1.3, 1.6, 1.9], dtype=torch.float64).view(1, 3, 1, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: S.entmax(a, b), (scores, alpha_h), eps=1e-6, atol=1e-6)


def test_sparse_maps_are_sparse_and_softmax_is_not():
    x = rand(8, 20, scale=3.0, seed=23)
    assert (S.softmax(x) > 0).all()
    for f in [S.sparsemax, S.entmax15, lambda z: S.normmax(z, 2.0), lambda z: S.k_subsets(z, 2)]:
        assert (f(x) == 0).any()


# --------------------------------------------------------------------------------------------------
# get_map
# --------------------------------------------------------------------------------------------------
def test_get_map_modes():
    x = rand(3, 8, scale=2.0, seed=24)
    alpha = torch.full((3, 1), 1.7, dtype=torch.float64)
    expect = {
        "softmax": torch.softmax(x, -1),
        "sparsemax": S.sparsemax(x),
        "entmax": S.entmax15(x),
        "entmax_alpha": S.entmax(x, 1.3),
        "gsh": S.entmax(x, alpha),
        "normmax": S.normmax(x, 3.0),
        "k_subsets": S.k_subsets(x, 3),
        "sequential_k_subsets": S.sequential_k_subsets(x, 3),
    }
    params = {"entmax_alpha": {"alpha": 1.3}, "gsh": {"alpha": alpha}, "normmax": {"alpha": 3.0},
              "k_subsets": {"k": 3}, "sequential_k_subsets": {"k": 3}}
    assert set(expect) == set(S.MODES)
    for mode in S.MODES:
        torch.testing.assert_close(S.get_map(mode, **params.get(mode, {}))(x), expect[mode])
    torch.testing.assert_close(S.get_map("k_subsets", k=3, normalize=False)(x), 3 * expect["k_subsets"])
    with pytest.raises(ValueError):
        S.get_map("nope")
    assert math.isclose(S.SEQUENTIAL_TRANSITION_DEFAULT, 100.0)


def test_get_map_without_parameters_uses_the_documented_defaults():
    """MODE_DEFAULTS names only parameters a mode takes, and get_map without them computes the map at exactly
    those values (1.5-entmax for entmax_alpha and gsh, 2-normmax, normalized 2-subsets)."""
    x = rand(4, 9, scale=3.0, seed=25)
    expect = {"entmax_alpha": S.entmax(x, 1.5), "gsh": S.entmax(x, 1.5), "normmax": S.normmax(x, 2.0),
              "k_subsets": S.k_subsets(x, 2), "sequential_k_subsets": S.sequential_k_subsets(x, 2, transition=100.0)}
    assert set(S.MODE_DEFAULTS) == set(expect)
    for mode, defaults in S.MODE_DEFAULTS.items():
        assert set(defaults) == set(S.MODE_PARAMS[mode])
        torch.testing.assert_close(S.get_map(mode)(x), expect[mode])
        torch.testing.assert_close(S.get_map(mode, **defaults)(x), expect[mode])
    assert S.with_defaults("normmax", {"alpha": 3.0}) == {"alpha": 3.0}


# --------------------------------------------------------------------------------------------------
# the two CPU implementations agree
# --------------------------------------------------------------------------------------------------
@TORCH_INTERNALS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [5, 64, 700])
def test_kernels_equal_torch_path(monkeypatch, n, dtype):
    """Outputs and vector-Jacobian products (x and a per-row alpha) of the numba kernels equal the torch
    solvers', with masked entries, a fully masked row, ties and scales 0.1..30."""
    if S._K is None:
        pytest.skip("numba not installed")
    rows = 60
    x = rand(rows, n, seed=50) * torch.logspace(-1, 1.5, rows, dtype=torch.float64).view(rows, 1)
    x[0] = float("-inf")
    x[1, : n // 2] = float("-inf")
    x[2] = 1.0
    x[3, : min(n, 4)] = 7.0
    x, g = x.to(dtype), rand(rows, n, seed=51, dtype=dtype)
    alpha = torch.linspace(1.05, 2.6, rows, dtype=dtype).view(rows, 1)
    maps = {"sparsemax": lambda z, a: S.sparsemax(z), "entmax15": lambda z, a: S.entmax15(z),
            "entmax_alpha": lambda z, a: S.entmax(z, a), "normmax2": lambda z, a: S.normmax(z, 2.0),
            "normmax3": lambda z, a: S.normmax(z, 3.0), "normmax1.5": lambda z, a: S.normmax(z, 1.5),
            "k_subsets3": lambda z, a: S.k_subsets(z, 3), "k_subsets2.5": lambda z, a: S._KSubsets.apply(z, 2.5)}  # capped simplex, k not an integer

    def run(fn, kernels):
        monkeypatch.setattr(S, "CPU_KERNELS", kernels)
        xx, aa = x.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
        y = fn(xx, aa)
        gx, ga = torch.autograd.grad((y * g).sum(), (xx, aa), allow_unused=True)
        return y, gx, ga

    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for name, fn in maps.items():
        (y_k, gx_k, ga_k), (y_t, gx_t, ga_t) = run(fn, True), run(fn, False)
        torch.testing.assert_close(y_k, y_t, atol=tol, rtol=0, msg=name)
        torch.testing.assert_close(gx_k, gx_t, atol=tol * 10, rtol=tol, msg=name)
        assert (y_k[0] == 0).all() and (y_k[1, : n // 2] == 0).all() and (gx_k[0] == 0).all(), name
        if ga_t is not None and dtype == torch.float64:
            torch.testing.assert_close(ga_k, ga_t, atol=1e-7, rtol=1e-7, msg=name)


@pytest.mark.parametrize("offset", [0.0, 1e3, -3e4])
def test_float32_maps_accurate_at_large_offsets(offset):
    """float32 rows are solved in float32 by the kernels, on scores shifted by the row max (exact for the
    entries near the root): the outputs equal the float64 solution for the same float32 scores to a few
    float32 ulps of 1 at any offset (solved on the raw scores, each entry would be off by ~ulp(offset))."""
    spread = torch.logspace(-1, 1.5, 200, dtype=torch.float64).view(200, 1)  # row scales 0.1..30
    x32 = (offset + rand(200, 64, seed=60) * spread).to(torch.float32)
    x64 = x32.double().numpy()
    cases = {"sparsemax": (S.sparsemax(x32), ref_sparsemax(x64)),
             "entmax15": (S.entmax15(x32), ref_entmax(x64, 1.5)),
             "normmax2": (S.normmax(x32, 2.0), ref_normmax(x64, 2.0)),
             "k_subsets3": (S.k_subsets(x32, 3, normalize=False), ref_budget(x64, 3)),
             "k_subsets7": (S.k_subsets(x32, 7, normalize=False), ref_budget(x64, 7))}
    for name, (got, ref) in cases.items():
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), torch.from_numpy(ref), atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("k", [2, 3.5])
def test_k_subsets_float32_root_far_below_the_max(k):
    """A far outlier puts tau ~1e4 below the row max: the kernel re-centers u = x - c on the first
    estimate of tau and refines there, keeping float32 precision (on x - max the entries that set tau
    would carry rounding errors of ulp(1e4) ~ 1e-3)."""
    x = rand(64, 100, scale=0.3, seed=61)
    x[::2, 7] = 1e4
    x32 = x.float()
    got = S._KSubsets.apply(x32, float(k)).double()  # the capped-simplex solver (k = 3.5: no subsets)
    torch.testing.assert_close(got, torch.from_numpy(ref_budget(x32.double().numpy(), k)), atol=1e-6, rtol=0)


def test_kernel_alpha_gradient_float32_close_to_float64(map_path):
    """The alpha-entmax kernels compute in float64 also for float32 inputs: the float32 alpha gradient
    matches the float64 one to float32 rounding of the inputs."""
    if map_path != "kernels":
        pytest.skip("a property of the kernels")
    x, g = rand(40, 30, scale=2.0, seed=52), rand(40, 30, seed=53)
    alpha = torch.linspace(1.1, 1.9, 40, dtype=torch.float64).view(40, 1)
    grads = []
    for dt in (torch.float64, torch.float32):
        aa = alpha.to(dt).detach().requires_grad_(True)
        (S.entmax(x.to(dt), aa) * g.to(dt)).sum().backward()
        grads.append(aa.grad.double())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,transition", [(1, 0.5), (2, 0.5), (3, 100.0), (4, 0.5)])
def test_sequential_optimal_on_many_rows(map_path, k, transition):
    """Optimality certificate of the sequential solver on 60 continuous rows (n = 10, all 210 or fewer
    structures enumerated, scales 0.1..10, masked entries), and every row converges."""
    if map_path != "kernels":
        pytest.skip("one implementation (numba); run once")
    n = 10
    x = rand(60, n, seed=70 + k) * torch.logspace(-1, 1, 60, dtype=torch.float64).view(60, 1)
    x[0, :3] = float("-inf")
    mu = S.sequential_k_subsets(x, k, transition=transition, normalize=False)
    Z = structures(n, k)
    for i in range(60):
        finite = torch.isfinite(x[i]).numpy()
        Zi = Z[(Z[:, ~finite] == 0).all(1)]  # structures over the unmasked items
        extra = transition * chain_pairs(Zi)
        assert_sparsemap_optimal(mu[i].numpy(), np.where(finite, x[i].numpy(), 0.0), Zi, extra)
    *_, iterations, status = S._K.seq_forward_info(x.numpy(), k, transition)
    assert (status == 0).all() and iterations.max() < 200


# rows (k = 3, transition 0.5) on which the earlier batched torch active set stopped at a suboptimal
# point: the active structures become affinely dependent (singular KKT system)
DEGENERATE_ROWS = [[0, 0, 1, 0, -1, 1], [-5, 0, -2, -1, -1, -1], [-5, 1, -1, 0, 0, 0], [4, 0, 0, 0, 1, -1],
                   [0, 0, 1, 0, -3, 1], [0, -2, -1, 2, -1, 0], [3, -1, -1, -1, 0, -2]]


def test_sequential_optimal_on_degenerate_rows(map_path):
    """Integer rows with many ties and a singular active set: the solver (ray step) still reaches the
    optimum, certified by enumeration, and reports convergence."""
    if map_path != "kernels":
        pytest.skip("one implementation (numba); run once")
    rng = np.random.default_rng(7)
    rows = np.vstack([np.array(DEGENERATE_ROWS, dtype=float), np.round(2 * rng.standard_normal((60, 6)))])
    Z = structures(6, 3)
    mu, _, _, _, status = S._K.seq_forward_info(rows, 3, 0.5)
    assert (status == 0).all()
    for i in range(len(rows)):
        assert_sparsemap_optimal(mu[i], rows[i], Z, 0.5 * chain_pairs(Z))
    np.testing.assert_allclose(mu.sum(1), 3.0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# issue 16: exact answers at the support boundary, at any offset and magnitude, in every dtype
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [3.0, 5.0, 9.0, 10.0])
def test_power_maps_exact_at_the_support_boundary(alpha):
    """An entry exactly at the boundary gets weight exactly 0, however small 1/(alpha - 1) makes the
    output exponent (a root a few ulps low would give it (ulps)^(1/(alpha-1)) ~ 1e-4 at alpha 5)."""
    e1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    for c in (0.0, 1e8, -(2.0 ** 40)):  # x + c exact
        # normmax: F(t) = sum [x - t]_+^(alpha/(alpha-1)) = 1 at t = max - 1, the second entry there
        torch.testing.assert_close(S.normmax(torch.tensor([[c + 1.0, c, c - 0.5]], dtype=torch.float64), alpha),
                                   e1, atol=0, rtol=0)
        # entmax: (alpha - 1) (x_1 - x_2) = 1 puts x_2 on the boundary
        if math.log2(alpha - 1.0).is_integer():  # d exact (else the input itself is off the boundary)
            d = 1.0 / (alpha - 1.0)
            row = torch.tensor([[c + d, c, c - 4.0]], dtype=torch.float64)
            torch.testing.assert_close(S.entmax(row, alpha), e1, atol=0, rtol=0)
            torch.testing.assert_close(S.entmax(row, torch.tensor([[alpha]], dtype=torch.float64)), e1,
                                       atol=0, rtol=0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.testing.assert_close(S.normmax(torch.tensor([[1.0, 0.0]], dtype=dtype), 5.0),
                                   torch.tensor([[1.0, 0.0]], dtype=dtype), atol=0, rtol=0)


@pytest.mark.parametrize("alpha,atol", [(2.5, 1e-6), (4.0, 1e-6), (5.0, 2e-4)])
def test_power_maps_float32_match_float64_solution(alpha, atol):
    """float32 rows (scales 0.1..30): alpha-entmax and normmax equal the float64 solution of the same
    float32 scores (the float64 root is found to the last bit; before, alpha 4 was off by 1.8e-5).
    At alpha 5 an entry within a few float64 ulps of the boundary moves by (ulps)^(1/4) ~ 1e-4 in
    any float64 solver (the map is only Hoelder-continuous there): atol 2e-4."""
    spread = torch.logspace(-1, 1.5, 120, dtype=torch.float64).view(120, 1)
    x32 = (rand(120, 40, seed=80) * spread).to(torch.float32)
    x64 = x32.double()
    torch.testing.assert_close(S.entmax(x32, alpha).double(), torch.from_numpy(ref_entmax(x64.numpy(), alpha)),
                               atol=atol, rtol=0)
    torch.testing.assert_close(S.normmax(x32, alpha).double(), torch.from_numpy(ref_normmax(x64.numpy(), alpha)),
                               atol=1e-6, rtol=0)


OFFSET_MAPS = {"sparsemax": (S.sparsemax, ref_sparsemax), "entmax15": (S.entmax15, lambda z: ref_entmax(z, 1.5)),
               "entmax_1.3": (lambda z: S.entmax(z, 1.3), lambda z: ref_entmax(z, 1.3)),
               "normmax_2": (lambda z: S.normmax(z, 2.0), lambda z: ref_normmax(z, 2.0)),
               "normmax_4": (lambda z: S.normmax(z, 4.0), lambda z: ref_normmax(z, 4.0)),
               "k_subsets_3": (lambda z: S.k_subsets(z, 3, normalize=False), lambda z: ref_budget(z, 3))}


@pytest.mark.parametrize("offset", [1e8, 1e12, 1e16, -1e20])
@pytest.mark.parametrize("name", list(OFFSET_MAPS))
def test_maps_shift_invariant_at_large_offsets(name, offset):
    """y(z) = y(z - max z) for z = fl(x + offset): the subtraction is exact for the entries near the
    max (Sterbenz), so the answer equals the reference on the shifted rows to float64 precision
    (unshifted, the torch path was off by 6e-5 at 1e12 and gave zeros at 1e20)."""
    f, ref = OFFSET_MAPS[name]
    x = rand(30, 12, scale=2.0, seed=81) * torch.logspace(-1, 1, 30, dtype=torch.float64).view(30, 1)
    z = x * max(1.0, abs(offset) * 2 ** -50) + offset  # spread kept above the offset's ulp
    expect = torch.from_numpy(ref((z - z.amax(-1, keepdim=True)).numpy()))
    torch.testing.assert_close(f(z), expect, atol=1e-9, rtol=0)


def test_issue_rows_at_huge_offsets():
    half = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(S.sparsemax(torch.tensor([[1e16 + 2, 1e16, 0.0]], dtype=torch.float64)),
                               torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), atol=0, rtol=0)
    for f in (S.sparsemax, S.entmax15, S.normmax, lambda z: S.entmax(z, 1.7), lambda z: S.k_subsets(z, 1)):
        torch.testing.assert_close(f(torch.tensor([[1e20, 1e20, 0.0]], dtype=torch.float64)), half, atol=0, rtol=0)


def test_k_subsets_at_1e30_magnitudes():
    """The root sits among entries of size 1e30 (ulp 1e14): solved on x - x_(k), exact there."""
    cases = [([[1e30, 0.0, -1e30, 5.0]], [[1.0, 0.0, 0.0, 1.0]]),
             ([[3e30, 1e30, -2e30, 1e30]], [[1.0, 0.5, 0.0, 0.5]]),
             ([[1e30, 1e29, 1e29 + 2 ** 50, -1e30, 7.0]], [[1.0, 0.0, 1.0, 0.0, 0.0]])]
    for dtype in (torch.float64, torch.float32):
        for row, want in cases[: 3 if dtype == torch.float64 else 2]:
            got = S.k_subsets(torch.tensor(row, dtype=dtype), 2, normalize=False)
            torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), atol=0, rtol=0)


def test_k_subsets_far_root_matches_reference():
    """Rows whose root lies far below the max (outliers 1e6 above the rest; long rows take the
    compact path on the torch side) against bisection on the same rows shifted by x_(k)."""
    x = rand(40, 300, scale=0.5, seed=82)
    x[::2, 3] = 1e6
    x[1::4, [5, 9]] = 1e6 + 0.25
    for k in (2, 3):
        mu = S.k_subsets(x, k, normalize=False)
        xs = x - x.topk(k, dim=-1).values[:, -1:]
        torch.testing.assert_close(mu, torch.from_numpy(ref_budget(xs.numpy(), k)), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype,offset", [(torch.bfloat16, 0.0), (torch.bfloat16, 300.0), (torch.bfloat16, -3e4),
                                          (torch.float16, 0.0), (torch.float16, 2e3), (torch.float16, -3e4)])
def test_half_precision_with_offsets(dtype, offset):
    """float16 / bfloat16 scores (the CUDA path's low-precision case; solved in float64 on the torch
    path, in float32 by the kernels): the output equals the float64 solution for the same scores
    rounded to the dtype, at offsets where the dtype's ulp exceeds 1."""
    f = [S.sparsemax, S.entmax15, lambda z: S.entmax(z, 1.3), lambda z: S.normmax(z, 3.0),
         lambda z: S.k_subsets(z, 2)]
    x = (offset + 4.0 * rand(20, 16, seed=83)).to(dtype)
    eps = torch.finfo(dtype).eps
    for fn in f:
        y = fn(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), fn(x.double()), atol=2 * eps, rtol=0)


# --------------------------------------------------------------------------------------------------
# sequential k-subsets: shift invariance, dtypes
# --------------------------------------------------------------------------------------------------
def test_sequential_k_subsets_shift_invariant(map_path):
    """Every structure scores k c more on x + c: the marginals do not move (x dyadic, so x + c is exact)."""
    if map_path != "kernels":
        pytest.skip("one implementation (numba); run once")
    x = torch.round(8 * rand(20, 9, scale=2.0, seed=84)) / 8
    for transition, k in [(S.SEQUENTIAL_TRANSITION_DEFAULT, 3), (1.0, 2), (0.5, 3)]:
        base = S.sequential_k_subsets(x, k, transition=transition)
        for c in (2.0 ** 30, -(2.0 ** 33), 1e10):
            torch.testing.assert_close(S.sequential_k_subsets(x + c, k, transition=transition), base,
                                       atol=1e-12, rtol=0)
    torch.testing.assert_close(S.sequential_k_subsets(torch.tensor([[1e16, 1e16, 0.0, -1e16]], dtype=torch.float64), 2),
                               torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64), atol=0, rtol=0)
    # the value shifts by k c exactly (energy of this mode)
    v = S.sequential_k_subsets_value(x, 3, 0.5)
    torch.testing.assert_close(S.sequential_k_subsets_value(x + 2.0 ** 30, 3, 0.5) - 3 * 2.0 ** 30, v, atol=1e-6, rtol=0)


def test_sequential_k_subsets_any_float_dtype_and_autocast(map_path):
    if map_path != "kernels":
        pytest.skip("one implementation (numba); run once")
    x = rand(6, 8, scale=2.0, seed=85)
    ref = S.sequential_k_subsets(x, 2, transition=0.5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        xd = x.to(dtype).requires_grad_(True)
        y = S.sequential_k_subsets(xd, 2, transition=0.5)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), S.sequential_k_subsets(xd.detach().double(), 2, transition=0.5),
                                   atol=torch.finfo(dtype).eps, rtol=0)
        y.float().pow(2).sum().backward()
        assert xd.grad.dtype == dtype and torch.isfinite(xd.grad).all()
    w = torch.eye(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = S.sequential_k_subsets(x.float() @ w, 2, transition=0.5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=0)
    y.float().sum().backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("name", list(ALL_MAPS))
def test_bfloat16_autocast_every_map(name):
    """Under torch.autocast('cpu', bfloat16) (the training scripts' bf16 mode) scores arrive in bf16:
    every map returns bf16 weights on the simplex and a finite gradient for the float32 weights."""
    f = ALL_MAPS[name]
    x = rand(5, 9, scale=2.0, seed=86, dtype=torch.float32)
    w = torch.eye(9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x @ w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), f(x.bfloat16().double()), atol=8e-3, rtol=0)
    (y.float() * rand(5, 9, seed=87, dtype=torch.float32)).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# empty inputs, NaN, misuse
# --------------------------------------------------------------------------------------------------
EMPTY_MAPS = dict(ALL_MAPS, entmax_tensor_alpha=lambda x: S.entmax(x, torch.tensor(1.3, dtype=x.dtype)),
                  k_subsets_2=lambda x: S.k_subsets(x, 2))


@pytest.mark.parametrize("name", list(EMPTY_MAPS))
def test_empty_in_empty_out(name):
    f = EMPTY_MAPS[name]
    for shape, dim in [((3, 0), -1), ((0, 5), -1), ((2, 0, 4), 1), ((0,), 0)]:
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        y = f(x) if dim == -1 else f(x.movedim(dim, -1)).movedim(-1, dim)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_hopfield_pooling_on_zero_bags():
    import layers
    for mode, params in [("softmax", {}), ("sparsemax", {}), ("gsh", {}), ("entmax_alpha", {"alpha": 1.3}),
                         ("k_subsets", {"k": 2}), ("sequential_k_subsets", {"k": 2})]:
        for steps in (1, 2, None):
            pool = layers.HopfieldPooling(8, n_heads=2, mode=mode, update_steps=steps, **params)
            out = pool(torch.randn(0, 5, 8))
            assert out.shape == (0, 1, 8)
            out.sum().backward()


NAN_MAPS = dict(ALL_MAPS, entmax_tensor_alpha=lambda x: S.entmax(x, torch.full((5, 1), 1.3, dtype=x.dtype)),
                normmax_10=lambda x: S.normmax(x, 10.0), k_subsets_2=lambda x: S.k_subsets(x, 2))


@pytest.mark.parametrize("name", list(NAN_MAPS))
def test_nan_in_nan_out(name):
    """One documented behaviour on every map: a row holding a NaN gives NaN weights and NaN gradients;
    the other rows (masked entries included) are unaffected."""
    f = NAN_MAPS[name]
    x = rand(5, 9, scale=2.0, seed=88)
    x[0, 3] = float("nan")
    x[1, :] = float("nan")
    x[2, [0, 4]] = float("-inf")
    x[3, 0] = float("nan")
    x[3, 1:] = float("-inf")  # NaN in an otherwise masked row
    xx = x.clone().requires_grad_(True)
    y = f(xx)
    assert torch.isnan(y[[0, 1, 3]]).all()
    torch.testing.assert_close(y[[2, 4]], f(torch.cat([x[2:3], x[4:5], x[2:3], x[4:5], x[4:5]]))[:2])
    (y * rand(5, 9, seed=89)).sum().backward()
    assert torch.isnan(xx.grad[[0, 1, 3]]).all() and torch.isfinite(xx.grad[[2, 4]]).all()


def test_misuse_gives_clear_errors():
    import layers
    x = rand(3, 4)
    with pytest.raises(TypeError, match="alpah"):
        S.get_map("entmax_alpha", alpah=1.2)
    with pytest.raises(TypeError, match="takes: none"):
        S.get_map("softmax", alpha=1.2)
    with pytest.raises(TypeError, match="alpah"):
        layers.HopfieldPooling(8, mode="entmax_alpha", alpah=1.2)
    with pytest.raises(ValueError, match="k=5 exceeds the 3 entries"):
        S.k_subsets(rand(2, 3), 5)
    with pytest.raises(ValueError, match="k=5 exceeds"):
        S.sequential_k_subsets(rand(2, 3), 5)
    for bad_k in (2.5, True, "2"):
        with pytest.raises(TypeError, match="k must be a positive integer"):
            S.k_subsets(x, bad_k)
        with pytest.raises(TypeError, match="k must be a positive integer"):
            S.get_map("k_subsets", k=bad_k)
    with pytest.raises(ValueError, match="positive"):
        S.sequential_k_subsets(x, 0)
    for f in (S.softmax, S.sparsemax, S.entmax15, S.normmax, S.k_subsets, S.sequential_k_subsets,
              lambda z: S.entmax(z, 1.3)):
        for bad in (torch.arange(4).view(1, 4), torch.ones(1, 4, dtype=torch.bool)):
            with pytest.raises(TypeError, match="floating-point"):
                f(bad)
    for alpha in (float("nan"), float("inf"), 0.5):
        with pytest.raises(ValueError, match="alpha must be >= 1 and finite"):
            S.entmax(x, alpha)
        with pytest.raises(ValueError, match="alpha must be >= 1 and finite"):
            S.entmax(x, torch.tensor([[1.5], [alpha], [1.2]], dtype=torch.float64))
        with pytest.raises(ValueError, match="alpha must be > 1 and finite"):
            S.normmax(x, alpha)
    with pytest.raises(ValueError, match="alpha must be > 1"):
        S.get_map("normmax", alpha=1.0)
    with pytest.raises(ValueError, match="transition"):
        S.sequential_k_subsets(x, 2, transition=float("nan"))
    with pytest.raises(TypeError, match="normalize"):
        S.k_subsets(x, 2, normalize="yes")
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        layers.retrieve(rand(2, 4), rand(5, 4), 1.0, steps=-1)
    torch.testing.assert_close(layers.retrieve(rand(2, 4), rand(5, 4), 1.0, steps=0), rand(2, 4))
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        layers.HopfieldPooling(8, n_heads=0)
    with pytest.raises(ValueError, match="num_pattern must be >= 1"):
        layers.HopfieldPooling(8, num_pattern=0)
    with pytest.raises(ValueError, match="num_stored must be >= 1"):
        layers.HopfieldLayer(8, num_stored=0)
