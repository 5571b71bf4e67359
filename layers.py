"""Hopfield layers with sparse and structured retrieval maps.

One retrieval rule underlies every module here (Ramsauer et al. 2021; Hu et al. 2023; Santos et al. 2024):

    q  <-  X^T y_Omega(beta X q)

where X holds the stored patterns (one per row), q is a state (query) pattern, beta the inverse
temperature and y_Omega one of the normalization maps of ``sparsemax.py`` (softmax, sparsemax,
1.5-entmax, alpha-entmax, learnable-alpha entmax (``gsh``), alpha-normmax, k-subsets and sequential
k-subsets SparseMAP). With softmax, one step is scaled-dot-product attention.

* ``retrieve`` / ``energy`` work on raw patterns (associative memory, theory figures).
* ``Hopfield`` is the general layer with learned projections (queries R, stored patterns Y).
* ``HopfieldPooling`` pools a set with ``num_pattern`` learned queries (signature of Hu et al.).
* ``HopfieldLayer`` looks inputs up in trainable stored patterns (Ramsauer et al.).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sibling(name: str):
    """A module of this library: ``<package>.<name>`` when installed as a package (see pyproject.toml),
    the flat ``<name>`` beside this file in a checkout."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


sparsemax = _sibling("sparsemax")

MODES = sparsemax.MODES


# --------------------------------------------------------------------------------------------------
# Retrieval and energy on raw patterns
# --------------------------------------------------------------------------------------------------
def _map_for(mode: str, map_params: dict) -> Callable[[Tensor], Tensor]:
    return sparsemax.get_map(mode, **map_params)


def association(q: Tensor, X: Tensor, beta: float, mode: str = "softmax", **map_params) -> Tensor:
    """Association weights y = y_Omega(beta X q), one per stored pattern.

    q: (..., d) queries; X: (N, d) shared memory or (..., N, d) one memory per query batch entry.
    Returns (..., N).
    """
    scores = torch.einsum("...nd,...d->...n", X, q) if X.dim() > 2 else q @ X.transpose(-1, -2)
    return _map_for(mode, map_params)(beta * scores)


def retrieve(q: Tensor, X: Tensor, beta: float, mode: str = "softmax", steps: int = 1,
             **map_params) -> Tensor:
    """Run ``steps`` >= 0 Hopfield updates q <- X^T y_Omega(beta X q) (batched over the leading dims of q)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (the number of updates), got {steps!r}")
    for _ in range(steps):
        y = association(q, X, beta, mode, **map_params)
        q = torch.einsum("...n,...nd->...d", y, X) if X.dim() > 2 else y @ X
    return q


def _regularizer(mode: str, y: Tensor, map_params: dict) -> Tensor:
    """Omega(y) on the (scaled) polytope of each map, summed over the last dim."""
    map_params = sparsemax.with_defaults(mode, map_params)
    if mode == "softmax":
        return torch.special.xlogy(y, y).sum(-1)
    if mode == "sparsemax":
        return 0.5 * (y.pow(2).sum(-1) - 1)
    if mode in ("entmax", "entmax_alpha", "gsh"):
        alpha = 1.5 if mode == "entmax" else map_params["alpha"]
        alpha = torch.as_tensor(alpha, dtype=y.dtype, device=y.device)
        if alpha.dim() > 0:
            alpha = alpha.squeeze(-1)
        return (y.clamp_min(0).pow(alpha.unsqueeze(-1) if alpha.dim() else alpha).sum(-1) - 1) / (
            alpha * (alpha - 1))
    if mode == "normmax":
        alpha = map_params["alpha"]
        return y.abs().pow(alpha).sum(-1).pow(1.0 / alpha) - 1
    if mode == "k_subsets":
        # weights w = mu / k with mu = argmax_{mu in M_k} <theta, mu> - 1/2 ||mu||^2, so on M_k / k
        # the map is argmax_w <theta, w> - (k/2) ||w||^2.
        # (with normalize=False the weights are the marginals themselves: Omega = 1/2 ||mu||^2)
        k = map_params["k"] if map_params["normalize"] else 1
        return 0.5 * k * y.pow(2).sum(-1)
    raise NotImplementedError(f"energy is not available for mode {mode!r}")


def energy(q: Tensor, X: Tensor, beta: float, mode: str = "softmax", **map_params) -> Tensor:
    """Hopfield-Fenchel-Young energy (Santos et al. 2024), up to a constant:

        E(q) = -1/beta L_Omega(beta X q; 1/N) + 1/2 ||q - X^T 1/N||^2
             = -1/beta Omega*(beta X q) + 1/2 ||q||^2 + const,

    with Omega*(theta) = <theta, y_Omega(theta)> - Omega(y_Omega(theta)) (for sequential k-subsets, the
    optimal value of its SparseMAP problem; divided by k when the weights are mu / k, so that
    grad Omega* is always the weights). The update of ``retrieve`` is
    a concave-convex step on E, so E never increases along it. Returns one energy per query.
    """
    theta = beta * (torch.einsum("...nd,...d->...n", X, q) if X.dim() > 2 else q @ X.transpose(-1, -2))
    if mode == "sequential_k_subsets":  # Omega* needs the chain's pair marginals: take the QP's value
        k = map_params.get("k", 2)
        value = sparsemax.sequential_k_subsets_value(
            theta, k, map_params.get("transition", sparsemax.SEQUENTIAL_TRANSITION_DEFAULT))
        conjugate = value / k if map_params.get("normalize", True) else value
        return -conjugate / beta + 0.5 * q.pow(2).sum(-1)
    y = _map_for(mode, map_params)(theta)
    conjugate = (theta * y).sum(-1) - _regularizer(mode, y, map_params)
    return -conjugate / beta + 0.5 * q.pow(2).sum(-1)


def separation(X: Tensor) -> Tensor:
    """Pattern separation Delta_i = <x_i, x_i> - max_{j != i} <x_i, x_j> (Ramsauer et al.), shape (N,)."""
    gram = X @ X.transpose(-1, -2)
    own = gram.diagonal(dim1=-2, dim2=-1)
    others = gram - torch.diag_embed(torch.full_like(own, float("inf")))
    return own - others.amax(-1)


# --------------------------------------------------------------------------------------------------
# Association masks
# --------------------------------------------------------------------------------------------------
def causal_mask(size: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (size, size) association mask, True above the diagonal: state pattern i may associate with
    stored patterns j <= i only (self-association in a causal transformer block)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(1)


def _head_mask(mask: Tensor, batch: int, heads: int, n_state: int, n_stored: int) -> Tensor:
    """An association mask as a (B | 1, H | 1, S, N) tensor."""
    allowed = "(S, N), (B, S, N), (B * n_heads, S, N) as in hflayers, or (B | 1, n_heads | 1, S, N)"
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"association_mask must be bool (True = may not associate) or float (added to "
                        f"the scores), not {mask.dtype}")
    if not 2 <= mask.dim() <= 4 or tuple(mask.shape[-2:]) != (n_state, n_stored):
        raise ValueError(f"association_mask of shape {tuple(mask.shape)} does not fit {n_state} state and "
                         f"{n_stored} stored patterns (B={batch}, n_heads={heads}): use {allowed}")
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3 and mask.shape[0] in (batch, batch * heads):
        return mask[:, None] if mask.shape[0] == batch else mask.view(batch, heads, n_state, n_stored)
    if mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[1] in (1, heads):
        return mask
    raise ValueError(f"association_mask of shape {tuple(mask.shape)} does not fit B={batch}, "
                     f"n_heads={heads}: use {allowed}")


def _score_bias(pad: Tensor | None, mask: Tensor | None, shape: tuple[int, int, int, int], extra: int,
                like: Tensor) -> Tensor | None:
    """Additive bias on the (B, H, S, N) scores: -inf where ``key_padding_mask`` (B, N) or a bool
    ``association_mask`` forbid a pair, a float ``association_mask`` as given; then ``extra`` columns of
    0 for the bias / zero patterns, which every state pattern may associate with."""
    batch, heads, n_state, n_stored = shape
    bias = None
    if pad is not None:
        if pad.dtype != torch.bool or tuple(pad.shape) != (batch, n_stored):
            raise ValueError(f"key_padding_mask must be a bool (B, N) = ({batch}, {n_stored}) tensor with "
                             f"True = padding, got {pad.dtype} of shape {tuple(pad.shape)}")
        bias = like.new_zeros(pad.shape).masked_fill(pad, float("-inf"))[:, None, None, :]
    if mask is not None:
        mask = _head_mask(mask, batch, heads, n_state, n_stored)
        mask = (like.new_zeros(mask.shape).masked_fill(mask, float("-inf")) if mask.dtype == torch.bool
                else mask.to(like.dtype))
        bias = mask if bias is None else bias + mask
    return F.pad(bias, (0, extra)) if bias is not None and extra else bias


MAP_PARAMS = ("alpha", "k", "transition", "normalize")
_HFLAYERS_NAMES = {"input_size": "d_model", "num_heads": "n_heads", "hidden_size": "head_dim",
                   "scaling": "scale", "update_steps_max": "update_steps (= update_steps_max + 1)",
                   "quantity": "num_pattern / num_stored", "association_activation": "(apply it to the output)"}


def _check_map_params(map_params: dict) -> None:
    """Every keyword that is not an option of ``Hopfield`` must be a parameter of the maps."""
    for name in map_params:
        if name not in MAP_PARAMS:
            hint = f" (hflayers' {name} is {_HFLAYERS_NAMES[name]} here)" if name in _HFLAYERS_NAMES else ""
            raise TypeError(f"unknown argument {name!r}{hint}: Hopfield takes its own options and the map "
                            f"parameters {', '.join(MAP_PARAMS)}")


def _head_width(d_model: int, n_heads: int, head_dim: int | None, stored_size: int, state_static: bool,
                stored_static: bool) -> int:
    """Key width of a head: head_dim, else a static input's width, else d_model / n_heads."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    static = {name: width for name, width, on in (("state_pattern_as_static", d_model, state_static),
                                                   ("stored_pattern_as_static", stored_size, stored_static)) if on}
    if head_dim is None and static:
        head_dim = next(iter(static.values()))
    elif head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or give head_dim)")
        head_dim = d_model // n_heads
    for name, width in static.items():
        if width != head_dim:
            raise ValueError(f"{name}: a static input enters every head as it is, so its width {width} "
                             f"must equal head_dim={head_dim}")
    return head_dim


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class Hopfield(nn.Module):
    """Hopfield association of state patterns R (queries) with stored patterns Y (keys) and pattern
    projections P (values; P = Y unless given, and R = Y = P in the one-tensor call ``hopfield(x)``).

    Per head h, after the optional LayerNorms of R, Y and P, with T = ``update_steps``:

        Q = R W_Q,  K = Y W_K,  V = P W_V            (an ``*_as_static`` input enters as it is, the same
                                                       for every head; ``pattern_projection_as_connected``:
                                                       V = (P W_K) W_V)
        K, V <- [K; b_K; 0], [V; b_V; 0]             (``concat_bias_pattern``, ``add_zero_association``)
        A_0 = y_Omega(beta_h Q K^T + M);   A_t = y_Omega(beta_h (A_{t-1} K) K^T + M),  t = 1 .. T-1
        Z_h = dropout(A_{T-1}) V;   output = [Z_1 .. Z_H] W_O

    q_t = A_{t-1} K is the Hopfield update of the state patterns in key space, so T = 1 is one retrieval
    (attention). M is -inf where ``key_padding_mask`` or a bool ``association_mask`` forbid a pair (weight
    exactly 0 in every mode) and a float ``association_mask`` as given. ``update_steps_eps`` stops head h
    once max_batch ||A_t - A_{t-1}||_F <= eps. ``update_steps=None`` iterates to the fixed point
    q* = y(beta q* K^T + M) K with the DEQ solver of ``deq.py`` (implicit gradients); a fixed point does
    not depend on its start except through the basin, so no gradient then reaches W_Q (or
    HopfieldPooling's queries). ``mix=False`` (= hflayers' ``disable_out_projection``) drops W_O: the
    output is the n_heads * pattern_size concatenated heads.

    Args (hflayers' name in brackets where it differs; README: migration table):
        d_model [input_size]: width of the state patterns R; default width of every input and output.
        n_heads [num_heads], head_dim [hidden_size]: heads and their key width (default d_model / n_heads,
            which must then be an integer; the static width for a static state or stored input).
        mode: retrieval map, one of ``sparsemax.MODES``; ``gsh`` learns one alpha per head in (1, 2).
        scale [scaling]: beta, a float or one per head (a (n_heads,) tensor; an nn.Parameter is learned);
            default 1 / sqrt(head_dim).
        update_steps: T above (int >= 1; hflayers' update_steps_max = T - 1) or None for the fixed point.
        update_steps_eps: optional early stop of the T steps (above); default None runs all T.
        dropout: dropout on the association weights A.   mix: mix the heads with W_O.
        normalize_patterns: LayerNorm on R and Y (Ramsauer et al.); ``normalize_state_pattern`` /
            ``normalize_stored_pattern`` override it per input. ``normalize_pattern_projection``: True gives
            P its own LayerNorm, False none; None (default) passes P through Y's LayerNorm (with P = Y: the
            same normalized tensor). ``normalize_affine`` / ``normalize_eps`` configure these LayerNorms.
        normalize_hopfield_space (+ ``_affine``): LayerNorm over each head's Q and K (one shared affine).
        stored_pattern_size, pattern_projection_size, pattern_size, output_size: widths of Y (default
            d_model), P (default Y's), of each head's V (default head_dim) and of the output (d_model).
        stored_pattern_as_static, state_pattern_as_static, pattern_projection_as_static: no projection.
        pattern_projection_as_connected: V = (P W_K) W_V (P must have Y's width).
        concat_bias_pattern, add_zero_association: a learned (per head) and a zero stored pattern.
        batch_first: inputs and output (B, S, .) if True, (S, B, .) if False; masks and A stay batch first.
        input_bias: biases of the projections.  init_std: if given, weights ~ N(0, init_std^2), biases 0
            (hflayers: 0.02); default PyTorch's Linear init.
        fixed_point: options of ``deq.fixed_point`` for ``update_steps=None`` (solver, max_iter, tol,
            backward, ...); default Anderson, tol 1e-5, implicit gradients with adjoint tol 1e-6. The last
            solve's statistics (iterations, residuals, seconds) are kept in ``last_fixed_point_stats``.
        map_params: map parameters, e.g. ``alpha`` (entmax_alpha, normmax, gsh initial value) or ``k``.
    """

    def __init__(self, d_model: int, n_heads: int = 1, mode: str = "softmax",
                 scale: float | Sequence[float] | Tensor | None = None, update_steps: int | None = 1,
                 dropout: float = 0.0, mix: bool = True, normalize_patterns: bool = False,
                 fixed_point: dict | None = None, head_dim: int | None = None, *,
                 stored_pattern_size: int | None = None, pattern_projection_size: int | None = None,
                 pattern_size: int | None = None, output_size: int | None = None,
                 normalize_state_pattern: bool | None = None, normalize_stored_pattern: bool | None = None,
                 normalize_pattern_projection: bool | None = None, normalize_affine: bool = True,
                 normalize_eps: float = 1e-5, normalize_hopfield_space: bool = False,
                 normalize_hopfield_space_affine: bool = False, state_pattern_as_static: bool = False,
                 stored_pattern_as_static: bool = False, pattern_projection_as_static: bool = False,
                 pattern_projection_as_connected: bool = False, update_steps_eps: float | None = None,
                 concat_bias_pattern: bool = False, add_zero_association: bool = False,
                 disable_out_projection: bool = False, batch_first: bool = True, input_bias: bool = True,
                 init_std: float | None = None, **map_params) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        _check_map_params(map_params)
        if update_steps is not None and update_steps < 1:
            raise ValueError("update_steps must be >= 1 or None (fixed point)")
        if update_steps_eps is not None and (update_steps is None or not update_steps_eps > 0):
            raise ValueError(f"update_steps_eps={update_steps_eps} needs an eps > 0 and an integer "
                             f"update_steps (the most steps); update_steps=None stops at fixed_point['tol']")
        self.d_model, self.n_heads, self.mode, self.batch_first = d_model, n_heads, mode, batch_first
        self.stored_size = stored_pattern_size or d_model
        self.projection_size = pattern_projection_size or self.stored_size
        self.d_head = _head_width(d_model, n_heads, head_dim, self.stored_size, state_pattern_as_static,
                                  stored_pattern_as_static)
        self.connected = pattern_projection_as_connected and not stored_pattern_as_static
        if self.connected and self.projection_size != self.stored_size:
            raise ValueError(f"pattern_projection_as_connected projects P with W_K: pattern_projection_size="
                             f"{self.projection_size} must equal stored_pattern_size={self.stored_size}")
        self.d_pattern = self._value_width(pattern_size, pattern_projection_as_static)
        self.update_steps, self.update_steps_eps = update_steps, update_steps_eps
        self.map_params = dict(map_params)
        # float32 cannot reach deq's default adjoint tolerance of 1e-8: stop the adjoint at 1e-6
        self.fixed_point_options = {"tol": 1e-5, "backward_tol": 1e-6, **(fixed_point or {})}
        self.last_fixed_point_stats: dict | None = None
        self._set_scale(scale)
        self._build_projections(state_pattern_as_static, stored_pattern_as_static, pattern_projection_as_static,
                                mix and not disable_out_projection, output_size, input_bias)
        norm = dict(normalize_affine=normalize_affine, eps=normalize_eps)
        self._build_norms(normalize_patterns, normalize_state_pattern, normalize_stored_pattern,
                          normalize_pattern_projection, normalize_hopfield_space,
                          normalize_hopfield_space_affine, **norm)
        self.dropout = nn.Dropout(dropout)
        self._build_extra_patterns(concat_bias_pattern, add_zero_association)
        if mode == "gsh":
            alpha0 = float(self.map_params.pop("alpha", sparsemax.MODE_DEFAULTS["gsh"]["alpha"]))
            if not 1.0 < alpha0 < 2.0:
                raise ValueError("gsh initial alpha must lie in (1, 2)")
            # alpha_h = 1 + sigmoid(a_h) stays in (1, 2)
            self.alpha_logit = nn.Parameter(torch.full((n_heads,), math.log((alpha0 - 1) / (2 - alpha0))))
        sparsemax.get_map(mode, **self.map_params)  # a misspelled or foreign map parameter is an error
        if init_std is not None:
            self._init_normal(init_std)
        # today's layer (all options at their defaults) may take the folded path of ``forward``
        self._plain = not (state_pattern_as_static or stored_pattern_as_static or pattern_projection_as_static
                           or pattern_projection_as_connected or normalize_hopfield_space or self.extra_patterns
                           or update_steps_eps is not None or isinstance(self.scale, Tensor) or not input_bias
                           or self.d_pattern != self.d_head or normalize_pattern_projection is not None)

    # ---------------------------------------------------------------------------------- construction
    def _value_width(self, pattern_size: int | None, static: bool) -> int:
        if static:  # V is P itself (or P W_K if connected)
            width = self.d_head if self.connected else self.projection_size
            if pattern_size not in (None, width):
                raise ValueError(f"pattern_size={pattern_size} with pattern_projection_as_static: the values "
                                 f"are the {'key-projected ' if self.connected else ''}pattern projections, "
                                 f"of width {width}")
            return width
        return pattern_size or self.d_head

    def _set_scale(self, scale: float | Sequence[float] | Tensor | None) -> None:
        """beta: a float (self.scale), or one per head (a buffer; a parameter if given as one)."""
        if scale is None or isinstance(scale, (int, float)):
            self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.d_head)
            return
        per_head = scale if isinstance(scale, Tensor) else torch.tensor(scale, dtype=torch.get_default_dtype())
        if per_head.shape != (self.n_heads,) or not per_head.is_floating_point():
            raise ValueError(f"scale must be a float or one float per head, shape ({self.n_heads},); "
                             f"got {per_head.dtype} of shape {tuple(per_head.shape)}")
        if isinstance(scale, nn.Parameter):
            self.scale = scale
        else:
            self.register_buffer("scale", per_head.detach().clone(), persistent=False)

    def _build_projections(self, state_static: bool, stored_static: bool, projection_static: bool,
                           out_projection: bool, output_size: int | None, bias: bool) -> None:
        inner, values = self.n_heads * self.d_head, self.n_heads * self.d_pattern
        self.q_proj = None if state_static else nn.Linear(self.d_model, inner, bias=bias)
        self.k_proj = None if stored_static else nn.Linear(self.stored_size, inner, bias=bias)
        self.v_proj = None if projection_static else nn.Linear(inner if self.connected else self.projection_size,
                                                               values, bias=bias)
        if out_projection:
            self.out_proj = nn.Linear(values, output_size or self.d_model, bias=bias)
        elif output_size not in (None, values):
            raise ValueError(f"output_size={output_size} needs the output projection (mix=True, "
                             f"disable_out_projection=False); without it the output is the concatenated "
                             f"heads, n_heads * pattern_size = {values} wide")
        else:
            self.out_proj = nn.Identity()
        self.output_size = (output_size or self.d_model) if out_projection else values

    def _build_norms(self, both: bool, state: bool | None, stored: bool | None, projection: bool | None,
                     hopfield_space: bool, hopfield_space_affine: bool, normalize_affine: bool,
                     eps: float) -> None:
        def layer_norm(on: bool, width: int, affine: bool = normalize_affine) -> nn.Module:
            return nn.LayerNorm(width, eps=eps, elementwise_affine=affine) if on else nn.Identity()

        self.norm_state = layer_norm(both if state is None else state, self.d_model)
        self.norm_stored = layer_norm(both if stored is None else stored, self.stored_size)
        # None: P goes through Y's LayerNorm (today's behaviour); True / False: its own / none
        self.norm_projection = None if projection is None else layer_norm(projection, self.projection_size)
        if (projection is None and isinstance(self.norm_stored, nn.LayerNorm)
                and self.projection_size != self.stored_size):
            raise ValueError(f"pattern_projection_size={self.projection_size} differs from stored_pattern_size="
                             f"{self.stored_size}: give normalize_pattern_projection=True (its own LayerNorm) "
                             f"or False (none) instead of sharing the stored patterns' LayerNorm")
        if hopfield_space_affine and not hopfield_space:
            raise ValueError("normalize_hopfield_space_affine=True needs normalize_hopfield_space=True")
        self.norm_hopfield_space = layer_norm(hopfield_space, self.d_head, hopfield_space_affine) \
            if hopfield_space else None

    def _build_extra_patterns(self, bias_pattern: bool, zero_pattern: bool) -> None:
        """The learned bias pattern (b_K, b_V per head) and the zero pattern appended to K and V."""
        if bias_pattern:
            self.bias_k = nn.Parameter(0.02 * torch.randn(self.n_heads, 1, self.d_head))
            self.bias_v = nn.Parameter(0.02 * torch.randn(self.n_heads, 1, self.d_pattern))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_association = zero_pattern
        self.extra_patterns = int(bias_pattern) + int(zero_pattern)

    def _init_normal(self, std: float) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        for pattern in (self.bias_k, self.bias_v):
            if pattern is not None:
                nn.init.normal_(pattern, std=std)

    @property
    def alpha(self) -> Tensor | None:
        """Per-head alpha of the ``gsh`` mode (None for other modes)."""
        return 1.0 + torch.sigmoid(self.alpha_logit) if self.mode == "gsh" else None

    # ---------------------------------------------------------------------------------- association
    def _normalize(self, scores: Tensor) -> Tensor:
        """y_Omega over the stored patterns of scores (B, H, S, N)."""
        if self.mode == "gsh":
            return sparsemax.entmax(scores, alpha=self.alpha.view(1, -1, 1, 1), dim=-1)
        return sparsemax.get_map(self.mode, **self.map_params)(scores)

    def _beta(self) -> float | Tensor:
        return self.scale.view(1, -1, 1, 1) if isinstance(self.scale, Tensor) else self.scale

    def _split(self, x: Tensor, width: int | None = None) -> Tensor:
        """(B, N, H * width) -> (B, H, N, width)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.n_heads, width or self.d_head).transpose(1, 2)

    def _heads(self, x: Tensor, projection: nn.Linear | None, width: int) -> Tensor:
        """A projected input split into heads, or a static one shared by all heads: (B, H, N, width)."""
        if projection is None:
            return x.unsqueeze(1).expand(-1, self.n_heads, -1, -1)
        return self._split(projection(x), width)

    def _weights(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        scores = self._beta() * q @ k.transpose(-1, -2)
        return self._normalize(scores if bias is None else scores + bias)

    def _fixed_point_queries(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        deq = _sibling("deq")  # imported here: the DEQ machinery is only needed for update_steps=None

        def update(state: Tensor) -> Tensor:
            return self._weights(state, k, bias) @ k

        q_star, self.last_fixed_point_stats = deq.fixed_point(update, q, **self.fixed_point_options)
        return q_star

    def folds_stored_projection(self, n_state: int) -> bool:
        """Whether ``forward`` skips projecting the stored patterns (see ``_folded_association``): with
        a fixed number of steps, when it costs less: ~4 H S N d_model multiply-adds instead of ~2 N d_model H d_head,
        i.e. when 2 S <= d_head (S state patterns; e.g. pooling with a few learned queries)."""
        return self.update_steps is not None and 2 * n_state <= self.d_head

    def _folded_association(self, q: Tensor, stored: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """Association without projecting the N stored patterns (exact reassociation; pays off when
        n_heads * S << N, e.g. pooling). With K_h = Y W_Kh^T + b_Kh and V_h = Y W_Vh^T + b_Vh:
            q K_h^T = (q W_Kh) Y^T + q b_Kh,     A K_h = (A Y) W_Kh^T + (A 1) b_Kh,
            dropout(A) V_h = (dropout(A) Y) W_Vh^T + (dropout(A) 1) b_Vh.
        Returns (Z (B, H, S, d_head), A (B, H, S, N))."""
        h, d = self.n_heads, self.d_head
        b, s, n = q.shape[0], q.shape[2], stored.shape[1]
        w_k, b_k = self.k_proj.weight.view(h, d, -1), self.k_proj.bias.view(1, h, 1, d)
        w_v, b_v = self.v_proj.weight.view(h, d, -1), self.v_proj.bias.view(1, h, 1, d)

        def weights_of(state: Tensor) -> Tensor:  # heads x states as one (B, H S, .) batch: no broadcast copies
            folded = torch.einsum("bhsd,hde->bhse", state, w_k).flatten(1, 2)
            # Y (q W_K)^T, not (q W_K) Y^T: the gradient w.r.t. Y then comes out in Y's own (B, N, d) layout
            # (the other order yields it transposed, and adding it to the read's gradient is a strided copy)
            scores = ((stored @ folded.transpose(-1, -2)).transpose(-1, -2).unflatten(1, (h, s))
                      + (state * b_k).sum(-1, keepdim=True)) * self.scale
            if pad is not None:
                scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
            return self._normalize(scores)

        def read(a: Tensor, w: Tensor, bias: Tensor) -> Tensor:
            pooled = (a.reshape(b, h * s, n) @ stored).unflatten(1, (h, s))
            return torch.einsum("bhse,hde->bhsd", pooled, w) + a.sum(-1, keepdim=True) * bias

        for _ in range(self.update_steps - 1):
            q = read(weights_of(q), w_k, b_k)
        weights = weights_of(q)
        return read(self.dropout(weights), w_v, b_v), weights

    def forward(self, R: Tensor | tuple[Tensor, Tensor, Tensor], Y: Tensor | None = None,
                key_padding_mask: Tensor | None = None, return_weights: bool = False, *,
                pattern_projection: Tensor | None = None,
                association_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """R: (B, S, d_model) state patterns; Y: (B, N, stored_pattern_size) stored patterns (default R);
        pattern_projection P: (B, N, pattern_projection_size) (default Y). R may also be hflayers' tuple
        (stored, state, pattern_projection). key_padding_mask: (B, N) bool, True marks padding;
        association_mask: bool (True = may not associate) or float (added to the scores), (S, N),
        (B, S, N), (B * n_heads, S, N) or (B | 1, n_heads | 1, S, N); ``causal_mask(S)`` for a causal
        self-association. Returns (B, S, output_size) [and A (B, H, S, N + extra patterns)]; with
        ``batch_first=False`` the inputs and the output are (S, B, .)."""
        R, Y, P = self._inputs(R, Y, pattern_projection)
        shape = (R.shape[0], self.n_heads, R.shape[1], Y.shape[1])
        bias = _score_bias(key_padding_mask, association_mask, shape, self.extra_patterns, R)
        R, Y, P = self._normalized(R, Y, P)
        if self._plain and P is Y and association_mask is None and self.folds_stored_projection(R.shape[1]):
            z, weights = self._folded_association(self._split(self.q_proj(R)), Y, key_padding_mask)
        else:
            q, k, v = self._project(R, Y, P)
            weights = self._associate(q, k, bias)
            z = self.dropout(weights) @ v
        out = self.out_proj(z.transpose(1, 2).flatten(2))  # flatten, not reshape(-1): a batch of 0 works
        out = out if self.batch_first else out.transpose(0, 1)
        return (out, weights) if return_weights else out

    def _inputs(self, R: Tensor | tuple, Y: Tensor | None, P: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(R, Y, P) batch first, checked; P is Y (the same object) when no projection was given."""
        if isinstance(R, (tuple, list)):
            if len(R) != 3 or Y is not None or P is not None:
                raise ValueError("a tuple input is hflayers' (stored, state, pattern_projection): three "
                                 "tensors, and then no Y or pattern_projection argument")
            Y, R, P = R
        Y = R if Y is None else Y
        P = Y if P is None else P
        if not self.batch_first:  # transpose each distinct tensor once, keeping P is Y
            moved = {id(t): t.transpose(0, 1) for t in (R, Y, P) if isinstance(t, Tensor) and t.dim() == 3}
            R, Y, P = (moved.get(id(t), t) for t in (R, Y, P))
        for name, t, width in (("state patterns R", R, self.d_model), ("stored patterns Y", Y, self.stored_size),
                               ("pattern projection P", P, self.projection_size)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                layout = f"(B, n, {width})" if self.batch_first else f"(n, B, {width}) (batch_first=False)"
                raise ValueError(f"{name} must be a 3-d tensor {layout}, got {got}")
        if not R.shape[0] == Y.shape[0] == P.shape[0] or Y.shape[1] != P.shape[1]:
            raise ValueError(f"R {tuple(R.shape)}, Y {tuple(Y.shape)} and P {tuple(P.shape)} (batch first) must "
                             f"share the batch size, and Y and P the number of stored patterns")
        return R, Y, P

    def _normalized(self, R: Tensor, Y: Tensor, P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        stored = self.norm_stored(Y)
        if self.norm_projection is None:  # P shares Y's LayerNorm
            return self.norm_state(R), stored, stored if P is Y else self.norm_stored(P)
        return self.norm_state(R), stored, self.norm_projection(P)

    def _project(self, R: Tensor, Y: Tensor, P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V (B, H, ., width) with the Hopfield-space LayerNorm and the extra stored patterns."""
        q, k = self._heads(R, self.q_proj, self.d_head), self._heads(Y, self.k_proj, self.d_head)
        if self.connected:  # V = (P W_K) W_V
            P = self.k_proj(P)
            v = self._split(P, self.d_head) if self.v_proj is None else self._split(self.v_proj(P), self.d_pattern)
        else:
            v = self._heads(P, self.v_proj, self.d_pattern)
        if self.norm_hopfield_space is not None:
            q, k = self.norm_hopfield_space(q), self.norm_hopfield_space(k)
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.expand(k.shape[0], -1, -1, -1))
            extra_v.append(self.bias_v.expand(v.shape[0], -1, -1, -1))
        if self.add_zero_association:
            extra_k.append(k.new_zeros(k.shape[0], self.n_heads, 1, k.shape[-1]))
            extra_v.append(v.new_zeros(v.shape[0], self.n_heads, 1, v.shape[-1]))
        if extra_k:
            k, v = torch.cat([k, *extra_k], 2), torch.cat([v, *extra_v], 2)
        return q, k, v

    def _associate(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        """A_{T-1} (B, H, S, N): T - 1 state updates (or the fixed point), each head stopping early
        once its weights change by at most ``update_steps_eps``."""
        if self.update_steps is None:
            return self._weights(self._fixed_point_queries(q, k, bias), k, bias)
        weights = self._weights(q, k, bias)
        active = torch.ones(self.n_heads, dtype=torch.bool, device=q.device)
        for _ in range(self.update_steps - 1):
            new = self._weights(weights @ k, k, bias)
            if self.update_steps_eps is None:
                weights = new
                continue
            change = (new - weights).detach().flatten(2).norm(dim=-1).amax(0)  # (H,)
            weights = torch.where(active.view(1, -1, 1, 1), new, weights)
            active = active & (change > self.update_steps_eps)
            if not active.any():
                break
        return weights


class HopfieldPooling(nn.Module):
    """Pool a set of patterns into ``num_pattern`` vectors with learned query (state) patterns.

    Signature of Hu et al. (2023): ``HopfieldPooling(d_model, n_heads, mix, update_steps, dropout, mode,
    scale, num_pattern)``; every other keyword argument (``alpha``, ``k``, ``normalize_patterns`` and the
    options of ``Hopfield``) goes to ``Hopfield``. Input (B, N, stored_pattern_size) (or hflayers' tuple
    (stored, pattern_projection)), optional key_padding_mask (B, N) with True = padding and
    association_mask (num_pattern, N) or as in ``Hopfield``; output (B, num_pattern, output_size).
    """

    def __init__(self, d_model: int, n_heads: int = 1, mix: bool = True, update_steps: int | None = 1,
                 dropout: float = 0.0, mode: str = "softmax", scale: float | Tensor | None = None,
                 num_pattern: int = 1, **kwargs) -> None:
        super().__init__()
        if num_pattern < 1:
            raise ValueError(f"num_pattern must be >= 1 (learned queries), got {num_pattern}")
        self.query = nn.Parameter(0.02 * torch.randn(1, num_pattern, d_model))
        self.hopfield = Hopfield(d_model, n_heads=n_heads, mode=mode, scale=scale,
                                 update_steps=update_steps, dropout=dropout, mix=mix, **kwargs)

    def forward(self, x: Tensor | tuple[Tensor, Tensor], key_padding_mask: Tensor | None = None,
                return_weights: bool = False, *,
                association_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        stored, projection = x if isinstance(x, (tuple, list)) else (x, None)
        batch_first = self.hopfield.batch_first
        queries = self.query.expand(stored.shape[0 if batch_first else 1], -1, -1)
        return self.hopfield(queries if batch_first else queries.transpose(0, 1), stored,
                             key_padding_mask=key_padding_mask, return_weights=return_weights,
                             pattern_projection=projection, association_mask=association_mask)


class HopfieldLayer(nn.Module):
    """Associate inputs with ``num_stored`` trainable stored patterns (a learned lookup table).

    The state patterns are the input, the stored patterns the trainable table ``stored`` (Ramsauer et al.,
    ``HopfieldLayer``); it is also the pattern projection unless ``lookup_weights_as_separated``, which
    reads the values from a second table ``targets`` (trainable iff ``lookup_targets_as_trainable``).
    Other keyword arguments go to ``Hopfield``. Input (B, S, d_model) -> output (B, S, output_size).
    """

    def __init__(self, d_model: int, n_heads: int = 1, num_stored: int = 16, mode: str = "softmax",
                 scale: float | Tensor | None = None, update_steps: int | None = 1, dropout: float = 0.0,
                 mix: bool = True, *, lookup_weights_as_separated: bool = False,
                 lookup_targets_as_trainable: bool = True, **kwargs) -> None:
        super().__init__()
        if not (lookup_targets_as_trainable or lookup_weights_as_separated):
            raise ValueError("lookup_targets_as_trainable=False needs lookup_weights_as_separated=True: "
                             "otherwise the targets are the (trainable) stored patterns themselves")
        if num_stored < 1:
            raise ValueError(f"num_stored must be >= 1 (trainable stored patterns), got {num_stored}")
        width = kwargs.get("stored_pattern_size") or d_model
        self.stored = nn.Parameter(torch.randn(1, num_stored, width) / math.sqrt(width))
        self.hopfield = Hopfield(d_model, n_heads=n_heads, mode=mode, scale=scale,
                                 update_steps=update_steps, dropout=dropout, mix=mix, **kwargs)
        self.targets = None
        if lookup_weights_as_separated:
            width = self.hopfield.projection_size
            self.targets = nn.Parameter(torch.randn(1, num_stored, width) / math.sqrt(width),
                                        requires_grad=lookup_targets_as_trainable)

    def forward(self, R: Tensor, return_weights: bool = False, *, key_padding_mask: Tensor | None = None,
                association_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """key_padding_mask (B, num_stored) and association_mask (S, num_stored), ... as in ``Hopfield``."""
        batch_first = self.hopfield.batch_first
        stored, targets = (None if table is None else table.expand(R.shape[0 if batch_first else 1], -1, -1)
                           for table in (self.stored, self.targets))
        if not batch_first:
            stored, targets = (None if t is None else t.transpose(0, 1) for t in (stored, targets))
        return self.hopfield(R, stored, key_padding_mask=key_padding_mask, return_weights=return_weights,
                             pattern_projection=targets, association_mask=association_mask)
