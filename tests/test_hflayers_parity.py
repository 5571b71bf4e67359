"""hflayers' options on our Hopfield modules, checked against closed forms written out per batch entry and
head in float64: association masks (causal), per-head beta, static patterns, a third input, connected
values, Hopfield-space LayerNorm, bias / zero patterns, early stopping, batch_first, lookup tables; every
option with every retrieval mode; a causal transformer block with 1.5-entmax attention that trains."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsemax
from layers import MODES, Hopfield, HopfieldLayer, HopfieldPooling, causal_mask

PARAMS = {"k_subsets": {"k": 2}, "sequential_k_subsets": {"k": 2}, "entmax_alpha": {"alpha": 1.3},
          "normmax": {"alpha": 2.0}}
D = torch.float64


def _map(hop, h):
    if hop.mode == "gsh":
        return lambda s: sparsemax.entmax(s, alpha=hop.alpha[h].item(), dim=-1)
    return sparsemax.get_map(hop.mode, **hop.map_params)


def _linear(x, lin, rows):
    return x @ lin.weight[rows].T + lin.bias[rows]


def _reference(hop, R, Y, P, mask=None, steps=1, eps=None, connected=False):
    """out[b] = [Z_1 .. Z_H] W_O + b_O with Z_h = A V_h, A = y(beta_h q K_h^T + M) after steps - 1 updates
    q <- A K_h (head h stops once max_b ||A_t - A_{t-1}||_F <= eps), one batch entry and head at a time."""
    H, dk, dv = hop.n_heads, hop.d_head, hop.d_pattern
    beta = hop.scale if isinstance(hop.scale, torch.Tensor) else torch.full((H,), hop.scale, dtype=D)
    weights = torch.zeros(R.shape[0], H, R.shape[1], Y.shape[1], dtype=D)
    z = torch.zeros(R.shape[0], R.shape[1], H * dv, dtype=D)
    for h in range(H):
        kr, vr = slice(h * dk, (h + 1) * dk), slice(h * dv, (h + 1) * dv)
        y = _map(hop, h)
        qs = [_linear(R[b], hop.q_proj, kr) for b in range(R.shape[0])]
        ks = [_linear(Y[b], hop.k_proj, kr) for b in range(R.shape[0])]
        vin = [_linear(P[b], hop.k_proj, slice(None)) if connected else P[b] for b in range(R.shape[0])]
        vs = [_linear(vin[b], hop.v_proj, vr) for b in range(R.shape[0])]

        def assoc(b, q):
            s = beta[h] * q @ ks[b].T
            return y(s if mask is None else s.masked_fill(mask, float("-inf")))

        A = [assoc(b, qs[b]) for b in range(R.shape[0])]
        for _ in range(steps - 1):
            new = [assoc(b, A[b] @ ks[b]) for b in range(R.shape[0])]
            change = max((n - a).norm() for n, a in zip(new, A))
            A = new
            if eps is not None and change <= eps:
                break
        for b in range(R.shape[0]):
            weights[b, h] = A[b]
            z[b, :, vr] = A[b] @ vs[b]
    return z @ hop.out_proj.weight.T + hop.out_proj.bias, weights


# ------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("mode", MODES)
def test_three_inputs_causal_mask_per_head_beta_match_closed_form(mode):
    """Y, P of their own widths, pattern_size / output_size, beta per head, a causal association mask,
    two update steps: equal to the closed form; future positions get weight exactly 0 in every mode."""
    torch.manual_seed(0)
    hop = Hopfield(8, n_heads=2, mode=mode, scale=torch.tensor([0.7, 2.5], dtype=D), update_steps=2,
                   stored_pattern_size=6, pattern_projection_size=5, pattern_size=3, output_size=7,
                   **PARAMS.get(mode, {})).double()
    R, Y, P = (torch.randn(3, 5, w, dtype=D) for w in (8, 6, 5))
    mask = causal_mask(5)
    out, w = hop(R, Y, return_weights=True, pattern_projection=P, association_mask=mask)
    expected, expected_w = _reference(hop, R, Y, P, mask, steps=2)
    assert out.shape == (3, 5, 7) and torch.allclose(out, expected, atol=1e-10)
    assert torch.allclose(w, expected_w, atol=1e-10)
    assert torch.all(w[..., mask] == 0)


def test_per_head_beta_is_the_beta_of_its_head():
    """Column c of the projections belongs to head c // head_dim: head h of a per-head beta is the layer
    with the scalar beta_h (hflayers tiles the betas with repeat, giving column c beta[c mod H])."""
    torch.manual_seed(0)
    betas = (0.3, 1.0, 4.0)
    hop = Hopfield(12, n_heads=3, mode="sparsemax", scale=torch.tensor(betas, dtype=D)).double()
    R, Y = torch.randn(2, 4, 12, dtype=D), torch.randn(2, 6, 12, dtype=D)
    _, w = hop(R, Y, return_weights=True)
    for h, beta in enumerate(betas):
        single = Hopfield(12, n_heads=3, mode="sparsemax", scale=beta).double()
        single.load_state_dict(hop.state_dict())
        assert torch.allclose(w[:, h], single(R, Y, return_weights=True)[1][:, h], atol=1e-12)
    learned = Hopfield(12, n_heads=3, scale=torch.nn.Parameter(torch.ones(3)))
    learned(torch.randn(1, 2, 12), torch.randn(1, 3, 12)).sum().backward()
    assert learned.scale.grad is not None and torch.all(learned.scale.grad != 0)


def test_static_patterns_match_closed_form():
    """All three inputs static: out = [y(beta_h R Y^T) P]_h, no projection; a static state with projected
    stored patterns: q = R in every head."""
    torch.manual_seed(0)
    R, Y, P = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 6, 4, dtype=D), torch.randn(2, 6, 5, dtype=D)
    hop = Hopfield(4, n_heads=2, mode="entmax", scale=torch.tensor([1.0, 3.0], dtype=D), mix=False,
                   pattern_projection_size=5, state_pattern_as_static=True, stored_pattern_as_static=True,
                   pattern_projection_as_static=True)
    assert list(hop.parameters()) == [] and hop.d_head == 4 and hop.output_size == 10
    out = hop(R, Y, pattern_projection=P)
    expected = torch.cat([sparsemax.entmax15(b * R @ Y.transpose(1, 2)) @ P for b in (1.0, 3.0)], -1)
    assert torch.allclose(out, expected, atol=1e-12)
    half = Hopfield(4, n_heads=2, mode="sparsemax", state_pattern_as_static=True, stored_pattern_size=6).double()
    assert half.q_proj is None and half.k_proj.weight.shape == (8, 6)
    Y6 = torch.randn(2, 6, 6, dtype=D)
    k = half._split(half.k_proj(Y6))
    z = sparsemax.sparsemax(0.5 * R.unsqueeze(1) @ k.transpose(-1, -2)) @ half._split(half.v_proj(Y6))
    assert torch.allclose(half(R, Y6), half.out_proj(z.transpose(1, 2).reshape(2, 3, 8)), atol=1e-12)


def test_connected_values_hopfield_space_norm_and_extra_patterns_match_closed_form():
    torch.manual_seed(0)
    R, Y, P = (torch.randn(2, 3, 6, dtype=D), torch.randn(2, 5, 6, dtype=D), torch.randn(2, 5, 6, dtype=D))
    hop = Hopfield(6, n_heads=2, mode="softmax", pattern_projection_as_connected=True).double()
    assert hop.v_proj.weight.shape == (6, 6)  # acts on the key-projected P
    assert torch.allclose(hop(R, Y, pattern_projection=P), _reference(hop, R, Y, P, connected=True)[0],
                          atol=1e-12)
    normed = Hopfield(6, n_heads=2, mode="sparsemax", scale=2.0, normalize_hopfield_space=True,
                      concat_bias_pattern=True, add_zero_association=True).double()
    q, k, v = (normed._split(p(x)) for p, x in ((normed.q_proj, R), (normed.k_proj, Y), (normed.v_proj, Y)))
    q, k = F.layer_norm(q, (3,)), F.layer_norm(k, (3,))
    zeros = torch.zeros(2, 2, 1, 3, dtype=D)
    k = torch.cat([k, normed.bias_k.expand(2, -1, -1, -1), zeros], 2)
    v = torch.cat([v, normed.bias_v.expand(2, -1, -1, -1), zeros], 2)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    A = sparsemax.sparsemax((2.0 * q @ k.transpose(-1, -2)).masked_fill(
        F.pad(pad, (0, 2))[:, None, None, :], float("-inf")))
    out, w = normed(R, Y, pad, return_weights=True)
    assert w.shape == (2, 2, 3, 7) and torch.allclose(w, A, atol=1e-12)
    assert torch.allclose(out, normed.out_proj((A @ v).transpose(1, 2).reshape(2, 3, 6)), atol=1e-12)


def test_update_steps_eps_stops_each_head_by_the_closed_form_rule():
    torch.manual_seed(0)
    R, Y = torch.randn(2, 3, 8, dtype=D), torch.randn(2, 9, 8, dtype=D)
    full = Hopfield(8, n_heads=2, mode="softmax", update_steps=12, scale=torch.tensor([0.5, 3.0], dtype=D)).double()
    changes = []
    for eps in (1e-3, 1e-1, 10.0):
        hop = Hopfield(8, n_heads=2, mode="softmax", update_steps=12, update_steps_eps=eps,
                       scale=torch.tensor([0.5, 3.0], dtype=D)).double()
        hop.load_state_dict(full.state_dict())
        for h in range(2):  # the reference stops each head on its own
            one = Hopfield(8, n_heads=2, mode="softmax", update_steps=12, scale=hop.scale[h].item()).double()
            one.load_state_dict(full.state_dict())
            _, ref_w = _reference(one, R, Y, Y, steps=12, eps=eps)
            assert torch.allclose(hop(R, Y, return_weights=True)[1][:, h], ref_w[:, h], atol=1e-12)
        changes.append((hop(R, Y) - full(R, Y)).abs().max().item())
    assert changes[0] < changes[1] < changes[2] and changes[2] > 1e-3  # eps = 10: a single update
    one_update = Hopfield(8, n_heads=2, mode="softmax", update_steps=2, scale=full.scale).double()
    one_update.load_state_dict(full.state_dict())
    assert torch.allclose(hop(R, Y), one_update(R, Y), atol=1e-12)


# ---------------------------------------------------------------------------------- input forms
def test_one_tensor_tuple_and_batch_first_calls():
    torch.manual_seed(0)
    hop = Hopfield(6, n_heads=2, mode="entmax").double()
    x, y, p = (torch.randn(2, 4, 6, dtype=D) for _ in range(3))
    assert torch.equal(hop(x), hop(x, x))
    assert torch.equal(hop((y, x, p)), hop(x, y, pattern_projection=p))  # hflayers' (stored, state, projection)
    seq = Hopfield(6, n_heads=2, mode="entmax", batch_first=False).double()
    seq.load_state_dict(hop.state_dict())
    mask = causal_mask(4)
    out, w = seq(x.transpose(0, 1), return_weights=True, association_mask=mask)
    ref, ref_w = hop(x, return_weights=True, association_mask=mask)
    assert torch.allclose(out, ref.transpose(0, 1), atol=1e-12) and torch.allclose(w, ref_w, atol=1e-12)


def test_pattern_projection_gets_its_own_layernorm():
    torch.manual_seed(0)
    hop = Hopfield(6, n_heads=2, normalize_patterns=True, normalize_pattern_projection=True,
                   pattern_projection_size=4).double()
    assert hop.norm_projection.weight.shape == (4,)
    R, Y, P = torch.randn(1, 2, 6, dtype=D), torch.randn(1, 3, 6, dtype=D), torch.randn(1, 3, 4, dtype=D)
    assert torch.allclose(hop(R, Y, pattern_projection=P), hop(R, Y, pattern_projection=3 * P - 2), atol=1e-4)
    assert not torch.allclose(hop(R, Y, pattern_projection=P), hop(R, Y, pattern_projection=P.flip(-1)))
    shared = Hopfield(6, n_heads=2, normalize_patterns=True)  # today's: P = Y through Y's LayerNorm
    assert shared.norm_projection is None and "norm_projection.weight" not in shared.state_dict()


def test_pooling_and_lookup_options():
    torch.manual_seed(0)
    pool = HopfieldPooling(6, 2, True, 1, 0.0, "sparsemax", 1.0, 3, batch_first=False,
                           pattern_projection_size=4, normalize_pattern_projection=False)
    x, p = torch.randn(5, 2, 6), torch.randn(5, 2, 4)
    out, w = pool((x, p), return_weights=True, association_mask=~causal_mask(5)[:3])
    assert out.shape == (3, 2, 6) and torch.all(w[..., ~causal_mask(5)[:3]] == 0)
    layer = HopfieldLayer(6, n_heads=2, num_stored=7, mode="entmax", lookup_weights_as_separated=True,
                          lookup_targets_as_trainable=False, pattern_projection_size=4).double()
    R = torch.randn(2, 3, 6, dtype=D)
    out = layer(R)
    expected, _ = _reference(layer.hopfield, R, layer.stored.expand(2, -1, -1), layer.targets.expand(2, -1, -1))
    assert torch.allclose(out, expected, atol=1e-12)
    out.sum().backward()
    assert layer.targets.grad is None and layer.stored.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lookup_weights_as_separated"):
        HopfieldLayer(6, lookup_targets_as_trainable=False)


def test_init_std_as_hflayers():
    hop = Hopfield(64, n_heads=4, init_std=0.02, concat_bias_pattern=True)
    for lin in (hop.q_proj, hop.k_proj, hop.v_proj, hop.out_proj):
        assert abs(lin.weight.std().item() - 0.02) < 2e-3 and torch.all(lin.bias == 0)


# -------------------------------------------------------------------------- every option, every mode
@pytest.mark.parametrize("steps", [3, None], ids=["steps3", "fixed_point"])
@pytest.mark.parametrize("mode", MODES)
def test_every_option_with_every_mode(mode, steps):
    """All options at once (beside static inputs): finite output and gradients, exact zeros where masked."""
    torch.manual_seed(0)
    hop = Hopfield(8, n_heads=2, mode=mode, update_steps=steps, scale=torch.tensor([0.5, 1.5]),
                   update_steps_eps=1e-6 if steps else None, stored_pattern_size=6, pattern_projection_size=6,
                   pattern_size=3, output_size=5, normalize_patterns=True, normalize_pattern_projection=True,
                   normalize_hopfield_space=True, normalize_hopfield_space_affine=True,
                   pattern_projection_as_connected=True, concat_bias_pattern=True, add_zero_association=True,
                   batch_first=False, init_std=0.1, fixed_point={"solver": "picard", "max_iter": 30},
                   **PARAMS.get(mode, {}))
    R, Y, P = (torch.randn(4, 2, w, requires_grad=True) for w in (8, 6, 6))
    pad = torch.tensor([[False, False, False, True], [False] * 4])
    out, w = hop(R, Y, pad, return_weights=True, pattern_projection=P, association_mask=causal_mask(4))
    assert out.shape == (4, 2, 5) and w.shape == (2, 2, 4, 6) and torch.isfinite(out).all()
    forbidden = causal_mask(4) | pad[:, None, None, :]
    assert torch.all(w[..., :4][forbidden.expand(2, 2, 4, 4)] == 0)
    out.pow(2).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (Y, P))
    assert (R.grad is None) == (steps is None)  # a fixed point does not depend on the starting state


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"scale": torch.ones(3)}, r"one float per head, shape \(2,\)"),
    ({"stored_pattern_as_static": True, "stored_pattern_size": 5, "head_dim": 4}, "head_dim=4"),
    ({"mix": False, "output_size": 3}, "output projection"),
    ({"update_steps": None, "update_steps_eps": 1e-3}, "integer update_steps"),
    ({"pattern_projection_as_connected": True, "pattern_projection_size": 3}, "must equal stored_pattern_size"),
    ({"normalize_patterns": True, "pattern_projection_size": 3}, "normalize_pattern_projection"),
    ({"normalize_hopfield_space_affine": True}, "normalize_hopfield_space=True"),
    ({"n_heads": 0}, "n_heads must be >= 1")])
def test_bad_options_are_rejected_naming_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hopfield(8, **{"n_heads": 2, **kwargs})


def test_unknown_keywords_are_rejected_not_swallowed_as_map_parameters():
    with pytest.raises(TypeError, match="hflayers' update_steps_max is update_steps"):
        HopfieldPooling(8, 2, update_steps_max=0)
    with pytest.raises(TypeError, match="'alpah'.*alpha, k, transition, normalize"):
        Hopfield(8, 2, mode="entmax_alpha", alpah=1.2)


def test_bad_inputs_are_rejected_before_any_work():
    hop = Hopfield(8, n_heads=2)
    R, Y = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"\(S, N\), \(B, S, N\), \(B \* n_heads, S, N\)"):
        hop(R, Y, association_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        hop(R, Y, association_mask=torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool \(B, N\) = \(2, 5\)"):
        hop(R, Y, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"stored patterns Y must be a 3-d tensor \(B, n, 8\)"):
        hop(R, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="hflayers' \\(stored, state, pattern_projection\\)"):
        hop((R, Y))
    # hflayers' (B * n_heads, S, N) association mask is accepted and means mask[b * H + h]
    per_head = torch.zeros(4, 3, 5, dtype=torch.bool)
    per_head[1, :, 0] = True  # batch 0, head 1 may not see stored pattern 0
    w = hop(R, Y, return_weights=True, association_mask=per_head)[1]
    assert torch.all(w[0, 1, :, 0] == 0) and torch.all(w[0, 0, :, 0] > 0) and torch.all(w[1, :, :, 0] > 0)


# ----------------------------------------------------------------------- causal transformer block
def _readme_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b)


def test_readme_causal_transformer_block_trains_and_never_looks_ahead():
    """The README's example: a causal block with 1.5-entmax Hopfield attention learns to output the
    previous token; future positions get weight exactly 0, so changing them changes no earlier output."""
    scope: dict = {}
    exec(compile(_readme_block("causal_mask("), "README.md", "exec"), scope)
    losses, block, tokens = scope["losses"], scope["block"], scope["tokens"]
    assert losses[-1] < 0.5 * losses[0], losses
    _, w = block.attention(block.embed(tokens), return_weights=True, association_mask=causal_mask(tokens.shape[1]))
    assert torch.all(w[..., causal_mask(tokens.shape[1])] == 0) and (w == 0).sum() > (w.numel() // 2)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 8
    with torch.no_grad():
        assert torch.equal(block(tokens)[:, :6], block(changed)[:, :6])
