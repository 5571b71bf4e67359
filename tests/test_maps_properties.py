"""Property tests of the maps of sparsemax.py (hypothesis): random rows over scales 1e-6..1e30,
offsets, masks and every float dtype, on both implementations (numba kernels, torch solvers).

Properties: the output lies on the map's polytope (simplex, or the capped simplex for unnormalized
k-subsets) with masked entries exactly 0; it is shift invariant (x + c with c exact in the dtype);
it agrees with the float64 solution for the same (rounded) scores to the dtype's precision.
Examples are generated from a few drawn integers (seed, sizes, exponents) and kept small, so the
whole file runs in a few seconds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsemax as S

torch.set_num_threads(1)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
MANTISSA = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
MAX_LOG10_SCALE = {torch.float64: 30, torch.float32: 30, torch.bfloat16: 30, torch.float16: 3}
# |y(x) - y_float64(x)|: a few ulps of 1 in the dtype (kernels solve float32 rows in float32)
AGREE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# grid 2^q of the shift test: (ints + c) 2^q stays normal and finite in the dtype
GRID_EXPONENTS = {torch.float64: (-60, 60), torch.float32: (-60, 60), torch.bfloat16: (-60, 60),
                  torch.float16: (-14, 4)}
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["kernels", "torch"])
def map_path(request, monkeypatch):
    if request.param == "kernels" and S._K is None:
        pytest.skip("numba not installed")
    monkeypatch.setattr(S, "CPU_KERNELS", request.param == "kernels")
    return request.param


def maps(k: int, n: int) -> dict:
    """name -> (map, True if the output is on the simplex (else mu with sum min(k, #finite)))."""
    out = {"softmax": (S.softmax, True), "sparsemax": (S.sparsemax, True), "entmax15": (S.entmax15, True),
           "entmax_1.3": (lambda z: S.entmax(z, 1.3), True), "entmax_2.5": (lambda z: S.entmax(z, 2.5), True),
           "entmax_tensor": (lambda z: S.entmax(z, torch.tensor(1.7)), True),
           "normmax_2": (lambda z: S.normmax(z, 2.0), True), "normmax_3": (lambda z: S.normmax(z, 3.0), True),
           "k_subsets": (lambda z: S.k_subsets(z, k), True),
           "k_subsets_mu": (lambda z: S.k_subsets(z, k, normalize=False), False)}
    if n <= 10:
        out["sequential"] = (lambda z: S.sequential_k_subsets(z, k, transition=0.5), True)
    return out


rows_spec = st.tuples(st.integers(0, 2 ** 31 - 1),  # seed
                      st.integers(1, 4), st.integers(1, 16),  # rows, cols
                      st.sampled_from(DTYPES), st.floats(-6.0, 30.0),  # dtype, log10 scale
                      st.sampled_from([0.0, 0.2]))  # fraction of masked entries


def draw_rows(spec) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x in its dtype, mask of the -inf entries, k) from a drawn spec; one row may be fully masked."""
    seed, b, n, dtype, log_scale, p_mask = spec
    rng = np.random.default_rng(seed)
    scale = 10.0 ** min(log_scale, MAX_LOG10_SCALE[dtype])
    x = torch.from_numpy(scale * rng.standard_normal((b, n)))
    mask = torch.from_numpy(rng.random((b, n)) < p_mask)
    if p_mask and b > 1:
        mask[-1] = True
    x = x.to(dtype).masked_fill(mask, float("-inf"))
    return x, mask, int(rng.integers(1, n + 1))


@PROPERTY_SETTINGS
@given(rows_spec)
def test_outputs_on_the_polytope(map_path, spec):
    x, mask, k = draw_rows(spec)
    n_finite = (~mask).sum(-1)
    eps = torch.finfo(x.dtype).eps
    for name, (f, simplex) in maps(k, x.shape[-1]).items():
        if name == "softmax" and map_path == "kernels":
            continue  # one implementation
        y = f(x)
        assert y.dtype == x.dtype and y.shape == x.shape, name
        y = y.double()
        assert torch.isfinite(y).all(), name
        assert (y[mask] == 0).all() and (y >= 0).all() and (y <= 1).all(), name
        total = (n_finite > 0).double() if simplex else n_finite.clamp_max(k).double()
        if simplex and name.startswith(("k_subsets", "sequential")):  # rows with <= k entries: #finite / k
            total = torch.where(n_finite >= k, total, n_finite.double() / k)
        torch.testing.assert_close(y.sum(-1), total, atol=4 * x.shape[-1] * eps * max(k, 1), rtol=0, msg=lambda m: f"{name}: {m}")


@PROPERTY_SETTINGS
@given(rows_spec)
def test_agreement_with_float64(map_path, spec):
    """y(x) in x's dtype equals the float64 solution for the same scores x.double()."""
    x, _, k = draw_rows(spec)
    if x.dtype == torch.float64:
        x = x.float()  # float64 is the reference
    for name, (f, _) in maps(k, x.shape[-1]).items():
        y, ref = f(x).double(), f(x.double())
        scale = 1.0 if name != "k_subsets_mu" else float(k)
        torch.testing.assert_close(y, ref, atol=AGREE[x.dtype] * scale, rtol=0, msg=lambda m: f"{name}: {m}")


@PROPERTY_SETTINGS
@given(rows_spec, st.integers(0, 2 ** 31 - 1), st.integers(0, 200))
def test_shift_invariance(map_path, spec, seed_c, log2_grid):
    """y(x + c) = y(x) for an offset c up to 2^(p-3) grid units with x and c on a common grid 2^q,
    so that x + c is exact in the dtype (p mantissa bits): every map solves on x - max."""
    _, b, n, dtype, _, p_mask = spec
    rng = np.random.default_rng(spec[0])
    p = MANTISSA[dtype]
    q_lo, q_hi = GRID_EXPONENTS[dtype]
    q = q_lo + log2_grid % (q_hi - q_lo + 1)
    ints = rng.integers(-(2 ** min(p - 4, 20)), 2 ** min(p - 4, 20) + 1, (b, n)).astype(np.float64)
    c = float(np.random.default_rng(seed_c).integers(-(2 ** (p - 3)), 2 ** (p - 3) + 1))
    x = torch.from_numpy(ints * 2.0 ** q)
    xc = torch.from_numpy((ints + c) * 2.0 ** q)
    mask = torch.from_numpy(rng.random((b, n)) < p_mask)
    x, xc = (t.masked_fill(mask, float("-inf")).to(dtype) for t in (x, xc))
    assert torch.equal((xc.double() - x.double())[~mask], torch.full_like(x.double(), c * 2.0 ** q)[~mask])
    k = int(rng.integers(1, n + 1))
    for name, (f, _) in maps(k, n).items():
        if name == "softmax":
            continue  # torch.softmax: not ours, not exact under shifts
        torch.testing.assert_close(f(xc).double(), f(x).double(), atol=torch.finfo(dtype).eps, rtol=0, msg=lambda m: f"{name}: {m}")
