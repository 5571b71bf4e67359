"""Hopfield layers: the retrieval math, the energy, exact retrieval, and that every mode is applied."""
import math

import pytest
import torch
import torch.nn.functional as F

import layers
import sparsemax
from layers import Hopfield, HopfieldLayer, HopfieldPooling, energy, retrieve, separation

ENERGY_MODES = [("softmax", {}), ("sparsemax", {}), ("entmax", {}), ("entmax_alpha", {"alpha": 1.3}),
                ("entmax_alpha", {"alpha": 1.8}), ("normmax", {"alpha": 2.0}), ("normmax", {"alpha": 3.0}),
                ("k_subsets", {"k": 2}), ("k_subsets", {"k": 3}),
                ("k_subsets", {"k": 2, "normalize": False}),
                ("sequential_k_subsets", {"k": 2}), ("sequential_k_subsets", {"k": 3, "transition": 0.5}),
                ("sequential_k_subsets", {"k": 2, "transition": 1.0, "normalize": False})]
SPARSE_MODES = ["sparsemax", "entmax", "entmax_alpha", "gsh", "normmax", "k_subsets"]


def _pattern_norm_unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    return X / X.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- retrieve
def test_retrieve_softmax_matches_closed_form():
    X = _pattern_norm_unit(7, 5, 0)
    q = torch.randn(3, 5, dtype=torch.float64)
    beta = 2.5
    expected = q
    for _ in range(3):
        expected = torch.softmax(beta * expected @ X.T, dim=-1) @ X
    assert torch.allclose(retrieve(q, X, beta, "softmax", steps=3), expected, atol=1e-12)


def test_retrieve_batched_memories_match_loop():
    Xb = torch.randn(4, 6, 3, dtype=torch.float64)
    q = torch.randn(4, 3, dtype=torch.float64)
    out = retrieve(q, Xb, 1.7, "sparsemax", steps=2)
    for b in range(4):
        assert torch.allclose(out[b], retrieve(q[b:b + 1], Xb[b], 1.7, "sparsemax", steps=2)[0], atol=1e-12)


def test_retrieve_gradcheck_float64():
    X = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for mode in ("softmax", "sparsemax", "entmax"):
        assert torch.autograd.gradcheck(lambda a, b: retrieve(a, b, 1.3, mode, steps=2), (q, X))


@pytest.mark.parametrize("mode,params", ENERGY_MODES)
def test_energy_never_increases_along_retrieve(mode, params):
    """The update is a CCCP step on the Hopfield-Fenchel-Young energy (Santos et al. 2024, Prop. 1)."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(12, 6, generator=g, dtype=torch.float64)
        q = 2 * torch.randn(8, 6, generator=g, dtype=torch.float64)
        beta = [0.1, 1.0, 4.0, 20.0][seed % 4]
        energies = [energy(q, X, beta, mode, **params)]
        for _ in range(6):
            q = retrieve(q, X, beta, mode, **params)
            energies.append(energy(q, X, beta, mode, **params))
        steps = torch.stack(energies)
        assert torch.all(steps[1:] <= steps[:-1] + 1e-9), (mode, params, seed, steps)


def test_softmax_energy_is_ramsauer_energy():
    """E = -1/beta lse(beta X q) + 1/2 ||q||^2 (Ramsauer et al.) up to a constant."""
    X = torch.randn(9, 4, dtype=torch.float64)
    q = torch.randn(5, 4, dtype=torch.float64)
    beta = 1.9
    ramsauer = -torch.logsumexp(beta * q @ X.T, -1) / beta + 0.5 * q.pow(2).sum(-1)
    diff = energy(q, X, beta, "softmax") - ramsauer
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-12)


def test_sparsemax_energy_matches_closed_form_conjugate():
    """Omega*(theta) = <theta, p> - 1/2(||p||^2 - 1) with p = sparsemax(theta)."""
    X = torch.randn(9, 4, dtype=torch.float64)
    q = torch.randn(5, 4, dtype=torch.float64)
    beta = 3.0
    theta = beta * q @ X.T
    # brute-force conjugate: max over the simplex by a fine search is costly; use the sorting closed form
    z, _ = torch.sort(theta, dim=-1, descending=True)
    ks = torch.arange(1, 10, dtype=torch.float64)
    support = 1 + ks * z > z.cumsum(-1)
    k = support.sum(-1, keepdim=True)
    tau = (z.cumsum(-1).gather(-1, k - 1) - 1) / k
    p = (theta - tau).clamp_min(0)
    conj = (theta * p).sum(-1) - 0.5 * (p.pow(2).sum(-1) - 1)
    expected = -conj / beta + 0.5 * q.pow(2).sum(-1)
    assert torch.allclose(energy(q, X, beta, "sparsemax"), expected, atol=1e-10)


# ---------------------------------------------------------------------------------------- exact retrieval
def _separated_patterns(n=10, d=64, seed=0):
    X = _pattern_norm_unit(n, d, seed)
    delta = separation(X)
    assert torch.all(delta > 0)
    return X, delta


@pytest.mark.parametrize("mode,params,margin", [
    ("sparsemax", {}, 1.0), ("entmax", {}, 2.0), ("entmax_alpha", {"alpha": 1.25}, 4.0),
    ("normmax", {"alpha": 2.0}, 1.0), ("normmax", {"alpha": 4.0}, 1.0)])
def test_exact_one_step_retrieval_past_margin(mode, params, margin):
    """Santos et al. 2024: if beta * Delta_i >= m, x_i is a fixed point and an eps-close query reaches
    it in one step; softmax never retrieves exactly."""
    X, delta = _separated_patterns()
    beta = 1.05 * margin / delta.min().item()
    fixed = retrieve(X, X, beta, mode, **params)
    assert torch.allclose(fixed, X, atol=1e-9, rtol=0)
    eps = 1e-3 * torch.randn_like(X)
    one_step = retrieve(X + eps, X, beta * 1.2, mode, **params)
    assert torch.allclose(one_step, X, atol=1e-9, rtol=0)
    dense = retrieve(X, X, beta, "softmax")
    assert (dense - X).abs().amax(-1).min() > 1e-12


def test_below_margin_not_a_fixed_point_for_sparsemax():
    X, delta = _separated_patterns()
    beta = 0.5 / delta.max().item()  # beta * Delta_i < 1 for every pattern
    y = layers.association(X, X, beta, "sparsemax")
    assert torch.all((y > 0).sum(-1) >= 2)
    assert torch.all((retrieve(X, X, beta, "sparsemax") - X).abs().amax(-1) > 1e-6)


def test_separation_matches_definition():
    X = torch.randn(5, 3, dtype=torch.float64)
    gram = X @ X.T
    for i in range(5):
        others = max(gram[i, j] for j in range(5) if j != i)
        assert math.isclose(separation(X)[i].item(), (gram[i, i] - others).item(), abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------- modules
def test_dense_hopfield_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    hop = Hopfield(16, n_heads=4, mode="softmax").double().eval()
    R, Y = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([hop.q_proj.weight, hop.k_proj.weight, hop.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([hop.q_proj.bias, hop.k_proj.bias, hop.v_proj.bias]))
        mha.out_proj.weight.copy_(hop.out_proj.weight)
        mha.out_proj.bias.copy_(hop.out_proj.bias)
        expected, expected_w = mha(R, Y, Y, key_padding_mask=pad, average_attn_weights=False)
        out, w = hop(R, Y, key_padding_mask=pad, return_weights=True)
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.allclose(w, expected_w, atol=1e-12)


def test_update_steps_iterate_queries_in_key_space():
    torch.manual_seed(1)
    hop = Hopfield(8, n_heads=2, mode="sparsemax", update_steps=3, scale=2.0).double()
    R, Y = torch.randn(2, 1, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = (hop._split(p(x)) for p, x in ((hop.q_proj, R), (hop.k_proj, Y), (hop.v_proj, Y)))
    for _ in range(2):
        q = sparsemax.sparsemax(2.0 * q @ k.transpose(-1, -2)) @ k
    z = sparsemax.sparsemax(2.0 * q @ k.transpose(-1, -2)) @ v
    expected = hop.out_proj(z.transpose(1, 2).reshape(2, 1, 8))
    assert torch.allclose(hop(R, Y), expected, atol=1e-12)


@pytest.mark.parametrize("mode, params", [("softmax", {}), ("sparsemax", {}), ("entmax", {}), ("gsh", {}),
                                          ("normmax", {"alpha": 2.0}), ("k_subsets", {"k": 2})])
@pytest.mark.parametrize("update_steps", [1, 2])
def test_folded_pooling_equals_projecting_the_stored_patterns(mode, params, update_steps, monkeypatch):
    """The folded association (K/V projections moved onto the few state patterns) equals the direct path:
    output, weights and every gradient, with padding and association dropout (same RNG draw), float64."""
    pool = HopfieldPooling(16, n_heads=2, num_pattern=2, update_steps=update_steps, dropout=0.3, mode=mode, scale=0.7,
                           **params).double().train()
    assert pool.hopfield.folds_stored_projection(2)
    Y = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True

    def run():
        torch.manual_seed(5)
        out, weights = pool(Y, key_padding_mask=pad, return_weights=True)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                    [Y, *pool.parameters()])
        return out, weights, grads

    folded = run()
    monkeypatch.setattr(Hopfield, "folds_stored_projection", lambda self, n_state: False)
    direct = run()
    assert torch.allclose(folded[0], direct[0], atol=1e-12) and torch.equal(folded[1] == 0, direct[1] == 0)
    assert torch.allclose(folded[1], direct[1], atol=1e-12)
    for got, expected in zip(folded[2], direct[2]):
        assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_every_mode_is_applied_and_sparse_modes_give_exact_zeros(mode):
    torch.manual_seed(0)
    kwargs = {"k": 2} if mode == "k_subsets" else {}
    pool = HopfieldPooling(32, 4, True, 1, 0.0, mode, 4.0, 2, **kwargs).eval()
    dense = HopfieldPooling(32, 4, True, 1, 0.0, "softmax", 4.0, 2).eval()
    dense.load_state_dict({k: v for k, v in pool.state_dict().items() if "alpha_logit" not in k})
    x = torch.randn(3, 20, 32)
    out, w = pool(x, return_weights=True)
    dense_out, dense_w = dense(x, return_weights=True)
    assert out.shape == (3, 2, 32) and w.shape == (3, 4, 2, 20)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, 2), atol=1e-5)
    assert (w == 0).any(), f"{mode} produced no exact zero"
    assert (dense_w > 0).all()
    assert not torch.allclose(out, dense_out, atol=1e-4), f"{mode} gives the softmax output"


def test_modes_give_distinct_outputs():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    outs = {}
    for mode in ("softmax", "sparsemax", "entmax", "normmax", "k_subsets"):
        torch.manual_seed(3)
        outs[mode] = HopfieldPooling(16, 2, True, 1, 0.0, mode, 3.0, 1)(x)
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(outs[a], outs[b], atol=1e-5), (a, b)


def test_gsh_learns_alpha_per_head_in_range():
    torch.manual_seed(0)
    pool = HopfieldPooling(16, 4, True, 1, 0.0, "gsh", 2.0, 1)
    assert torch.allclose(pool.hopfield.alpha, torch.full((4,), 1.5))
    pool(torch.randn(2, 6, 16)).pow(2).sum().backward()
    grad = pool.hopfield.alpha_logit.grad
    assert grad is not None and torch.all(grad != 0)
    with torch.no_grad():
        pool.hopfield.alpha_logit.fill_(50.0)
    assert torch.all(pool.hopfield.alpha <= 2.0) and torch.all(pool.hopfield.alpha > 1.0)


def test_gsh_alpha_matches_fixed_entmax():
    torch.manual_seed(0)
    gsh = Hopfield(8, 2, mode="gsh", alpha=1.7).double()
    fixed = Hopfield(8, 2, mode="entmax_alpha", alpha=1.7).double()
    fixed.load_state_dict({k: v for k, v in gsh.state_dict().items() if "alpha_logit" not in k})
    R, Y = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    assert torch.allclose(gsh(R, Y), fixed(R, Y), atol=1e-8)


@pytest.mark.parametrize("mode", ["softmax", "sparsemax", "entmax", "gsh", "normmax", "k_subsets"])
def test_padding_gets_zero_weight_and_does_not_change_output(mode):
    torch.manual_seed(0)
    pool = HopfieldPooling(16, 2, True, 2, 0.0, mode, 1.0, 1).eval()
    x = torch.randn(1, 5, 16)
    padded = torch.cat([x, 100 * torch.randn(1, 3, 16)], dim=1)
    pad = torch.tensor([[False] * 5 + [True] * 3])
    out, w = pool(padded, key_padding_mask=pad, return_weights=True)
    assert torch.all(w[..., 5:] == 0)
    assert torch.allclose(out, pool(x), atol=1e-5)


def test_fully_masked_bag_gives_finite_output():
    pool = HopfieldPooling(8, 2, True, 1, 0.0, "sparsemax", 1.0, 1)
    out, w = pool(torch.randn(2, 4, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool),
                  return_weights=True)
    assert torch.isfinite(out).all() and torch.all(w == 0)


def test_mix_false_keeps_heads_separate():
    torch.manual_seed(0)
    hop = Hopfield(8, n_heads=2, mix=False)
    assert isinstance(hop.out_proj, torch.nn.Identity)
    R, Y = torch.randn(1, 1, 8), torch.randn(1, 4, 8)
    out, w = hop(R, Y, return_weights=True)
    v = hop.v_proj(Y).view(1, 4, 2, 4).transpose(1, 2)
    assert torch.allclose(out.view(2, 4), (w @ v).view(2, 4), atol=1e-6)


def test_dropout_acts_on_association_weights_in_training_only():
    torch.manual_seed(0)
    pool = HopfieldPooling(16, 2, True, 1, 0.5, "softmax", None, 1)
    x = torch.randn(4, 10, 16)
    pool.eval()
    assert torch.equal(pool(x), pool(x))
    pool.train()
    assert not torch.allclose(pool(x), pool(x))


def test_hopfield_layer_trains_its_stored_patterns():
    torch.manual_seed(0)
    layer = HopfieldLayer(8, n_heads=2, num_stored=5, mode="sparsemax")
    out = layer(torch.randn(3, 4, 8))
    assert out.shape == (3, 4, 8)
    out.sum().backward()
    assert layer.stored.grad is not None and layer.stored.grad.abs().sum() > 0


def test_normalize_patterns_applies_layernorm():
    torch.manual_seed(0)
    hop = Hopfield(8, 2, normalize_patterns=True)
    R, Y = torch.randn(1, 2, 8), torch.randn(1, 3, 8)
    assert torch.allclose(hop(R, Y), hop(10 * R + 3, 5 * Y - 1), atol=1e-4)


def test_bad_arguments_are_rejected_with_choices():
    with pytest.raises(ValueError, match="sparsemax"):
        Hopfield(8, 2, mode="nope")
    with pytest.raises(ValueError, match="divisible"):
        Hopfield(10, 3)


def test_hopfield_gradcheck_sparse_mode():
    torch.manual_seed(0)
    hop = Hopfield(4, 2, mode="sparsemax", update_steps=2, scale=1.5).double()
    R = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, y: hop(r, y), (R, Y))


def test_scaled_dot_product_reference_single_head():
    """Sanity anchor against torch's functional attention."""
    q, k, v = (torch.randn(2, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    ours = sparsemax.softmax(q @ k.transpose(-1, -2) / 2.0) @ v
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v), atol=1e-12)


@pytest.mark.parametrize("mode,solver", [("softmax", "anderson"), ("softmax", "picard"),
                                         ("sparsemax", "picard"), ("entmax", "picard")])
def test_fixed_point_retrieval_matches_long_iteration_and_its_gradient(mode, solver):
    """update_steps=None solves q* = y(beta q* K^T) K; value and implicit gradient match a long unroll.
    (Sparse maps have several fixed points: Picard follows the plain iteration into the same one.)"""
    torch.manual_seed(0)
    opts = {"solver": solver, "max_iter": 300, "tol": 1e-11, "backward_iter": 300, "backward_tol": 1e-12}
    deq_hop = Hopfield(8, 2, mode=mode, update_steps=None, scale=0.5, fixed_point=opts).double()
    unrolled = Hopfield(8, 2, mode=mode, update_steps=400, scale=0.5).double()
    unrolled.load_state_dict(deq_hop.state_dict())
    R, Y = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    out_deq, out_unrolled = deq_hop(R, Y), unrolled(R, Y)
    assert torch.allclose(out_deq, out_unrolled, atol=1e-7)
    assert deq_hop.last_fixed_point_stats["converged"]
    out_deq.pow(2).sum().backward()
    out_unrolled.pow(2).sum().backward()
    for (name, p), q in zip(deq_hop.named_parameters(), unrolled.parameters()):
        if name.startswith("q_proj"):  # a fixed point does not depend on where the iteration starts
            assert p.grad is None and q.grad.abs().max() < 1e-6, name
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_head_dim_decouples_head_width_from_d_model():
    """n_heads * head_dim need not equal d_model (Hu et al.'s d_keys = hid_dim per head)."""
    torch.manual_seed(0)
    hop = Hopfield(10, n_heads=3, head_dim=4, mode="sparsemax", scale=0.7).double()
    assert hop.q_proj.weight.shape == (12, 10) and hop.out_proj.weight.shape == (10, 12)
    R, Y = torch.randn(2, 1, 10, dtype=torch.float64), torch.randn(2, 5, 10, dtype=torch.float64)
    out, w = hop(R, Y, return_weights=True)
    q, k, v = (hop._split(p(x)) for p, x in ((hop.q_proj, R), (hop.k_proj, Y), (hop.v_proj, Y)))
    z = sparsemax.sparsemax(0.7 * q @ k.transpose(-1, -2)) @ v
    assert torch.allclose(out, hop.out_proj(z.transpose(1, 2).reshape(2, 1, 12)), atol=1e-12)
    assert out.shape == (2, 1, 10) and w.shape == (2, 3, 1, 5)
    # without the output projection the output is the concatenated heads, n_heads * head_dim wide
    separate = Hopfield(10, n_heads=3, head_dim=4, mode="sparsemax", scale=0.7, mix=False).double()
    separate.load_state_dict({k: v for k, v in hop.state_dict().items() if not k.startswith("out_proj")})
    assert torch.allclose(separate(R, Y), z.transpose(1, 2).reshape(2, 1, 12), atol=1e-12)


@pytest.mark.parametrize("transition", [0.0, 0.7, 100.0])
def test_sequential_value_gradient_is_the_marginals(transition):
    """Danskin: d Omega*(theta) / d theta = mu; central differences of the value match the map."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mu = sparsemax.sequential_k_subsets(theta, 2, transition=transition, normalize=False)
    eps = 1e-6
    for i in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[i] = eps
        fd = (sparsemax.sequential_k_subsets_value(theta + e, 2, transition)
              - sparsemax.sequential_k_subsets_value(theta - e, 2, transition)) / (2 * eps)
        assert torch.allclose(fd, mu[:, i], atol=1e-6), (i, fd, mu[:, i])
