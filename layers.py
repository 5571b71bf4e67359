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

import math
from typing import Callable

import torch
from torch import Tensor, nn

import sparsemax

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
    """Run ``steps`` Hopfield updates q <- X^T y_Omega(beta X q) (batched over the leading dims of q)."""
    for _ in range(steps):
        y = association(q, X, beta, mode, **map_params)
        q = torch.einsum("...n,...nd->...d", y, X) if X.dim() > 2 else y @ X
    return q


def _regularizer(mode: str, y: Tensor, map_params: dict) -> Tensor:
    """Omega(y) on the (scaled) polytope of each map, summed over the last dim."""
    if mode == "softmax":
        return torch.special.xlogy(y, y).sum(-1)
    if mode == "sparsemax":
        return 0.5 * (y.pow(2).sum(-1) - 1)
    if mode in ("entmax", "entmax_alpha", "gsh"):
        alpha = 1.5 if mode == "entmax" else map_params.get("alpha", 1.5)
        alpha = torch.as_tensor(alpha, dtype=y.dtype, device=y.device)
        if alpha.dim() > 0:
            alpha = alpha.squeeze(-1)
        return (y.clamp_min(0).pow(alpha.unsqueeze(-1) if alpha.dim() else alpha).sum(-1) - 1) / (
            alpha * (alpha - 1))
    if mode == "normmax":
        alpha = map_params.get("alpha", 2.0)
        return y.abs().pow(alpha).sum(-1).pow(1.0 / alpha) - 1
    if mode == "k_subsets":
        # weights w = mu / k with mu = argmax_{mu in M_k} <theta, mu> - 1/2 ||mu||^2, so on M_k / k
        # the map is argmax_w <theta, w> - (k/2) ||w||^2.
        # (with normalize=False the weights are the marginals themselves: Omega = 1/2 ||mu||^2)
        k = map_params.get("k", 2) if map_params.get("normalize", True) else 1
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
# Modules
# --------------------------------------------------------------------------------------------------
class Hopfield(nn.Module):
    """Hopfield association of state patterns R (queries) with stored patterns Y (keys/values).

    Per head h:  Q = R W_Q,  K = Y W_K,  V = Y W_V  and, with T = ``update_steps``,

        q_0 = Q;   q_t = y_Omega(beta q_{t-1} K^T) K   for t = 1 .. T-1   (state update in key space)
        A   = y_Omega(beta q_{T-1} K^T);   Z = dropout(A) V

    so T = 1 is one retrieval (attention) and T > 1 iterates the Hopfield update on the queries before
    reading out the values. ``update_steps=None`` iterates to the fixed point q* = y(beta q* K^T) K
    with the DEQ solver of ``deq.py`` (implicit gradients). A fixed point does not depend on the
    starting query except through the basin it lies in, so with ``update_steps=None`` no gradient
    reaches W_Q (or HopfieldPooling's learned queries): they only pick the basin. Heads are concatenated; with ``mix=True``
    a learned output projection W_O mixes them, with ``mix=False`` the heads stay separate (no W_O).

    Args:
        d_model: pattern width (input and output).
        n_heads: number of heads.
        head_dim: width of each head's association space (default d_model / n_heads, which must then
            be an integer). Heads project to n_heads * head_dim (Hu et al.'s ``d_keys = hid_dim``).
        mode: retrieval map, one of ``sparsemax.MODES``; ``gsh`` learns one alpha per head in (1, 2).
        scale: beta; default 1 / sqrt(head_dim).
        update_steps: T above (int >= 1) or None for the fixed point.
        dropout: dropout on the association weights A.
        mix: mix heads with an output projection.
        normalize_patterns: LayerNorm on state and stored patterns before projection (Ramsauer et al.).
        fixed_point: options of ``deq.fixed_point`` for ``update_steps=None`` (solver, max_iter, tol,
            backward, ...); default Anderson, tol 1e-5, implicit gradients with adjoint tol 1e-6. The last solve's statistics
            (iterations, residuals, seconds) are kept in ``last_fixed_point_stats``.
        map_params: map parameters, e.g. ``alpha`` (entmax_alpha, normmax, gsh initial value) or ``k``.
    """

    def __init__(self, d_model: int, n_heads: int = 1, mode: str = "softmax", scale: float | None = None,
                 update_steps: int | None = 1, dropout: float = 0.0, mix: bool = True,
                 normalize_patterns: bool = False, fixed_point: dict | None = None,
                 head_dim: int | None = None, **map_params) -> None:
        super().__init__()
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or give head_dim)")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if update_steps is not None and update_steps < 1:
            raise ValueError("update_steps must be >= 1 or None (fixed point)")
        self.d_model, self.n_heads, self.mode = d_model, n_heads, mode
        self.d_head = head_dim if head_dim is not None else d_model // n_heads
        inner = n_heads * self.d_head
        if not mix and inner != d_model:
            raise ValueError("mix=False needs n_heads * head_dim == d_model (no output projection)")
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.d_head)
        self.update_steps = update_steps
        self.map_params = dict(map_params)
        # float32 cannot reach deq's default adjoint tolerance of 1e-8: stop the adjoint at 1e-6
        self.fixed_point_options = {"tol": 1e-5, "backward_tol": 1e-6, **(fixed_point or {})}
        self.last_fixed_point_stats: dict | None = None
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_model, inner)
        self.v_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(inner, d_model) if mix else nn.Identity()
        self.norm_state = nn.LayerNorm(d_model) if normalize_patterns else nn.Identity()
        self.norm_stored = nn.LayerNorm(d_model) if normalize_patterns else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        if mode == "gsh":
            alpha0 = float(self.map_params.pop("alpha", 1.5))
            if not 1.0 < alpha0 < 2.0:
                raise ValueError("gsh initial alpha must lie in (1, 2)")
            # alpha_h = 1 + sigmoid(a_h) stays in (1, 2)
            self.alpha_logit = nn.Parameter(torch.full((n_heads,), math.log((alpha0 - 1) / (2 - alpha0))))

    @property
    def alpha(self) -> Tensor | None:
        """Per-head alpha of the ``gsh`` mode (None for other modes)."""
        return 1.0 + torch.sigmoid(self.alpha_logit) if self.mode == "gsh" else None

    def _normalize(self, scores: Tensor) -> Tensor:
        """y_Omega over the stored patterns of scores (B, H, S, N)."""
        if self.mode == "gsh":
            return sparsemax.entmax(scores, alpha=self.alpha.view(1, -1, 1, 1), dim=-1)
        return sparsemax.get_map(self.mode, **self.map_params)(scores)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.d_head).transpose(1, 2)

    def _weights(self, q: Tensor, k: Tensor, pad: Tensor | None) -> Tensor:
        scores = self.scale * q @ k.transpose(-1, -2)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        return self._normalize(scores)

    def _fixed_point_queries(self, q: Tensor, k: Tensor, pad: Tensor | None) -> Tensor:
        import deq  # local import: the DEQ machinery is only needed for update_steps=None

        def update(state: Tensor) -> Tensor:
            return self._weights(state, k, pad) @ k

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
            folded = torch.einsum("bhsd,hde->bhse", state, w_k).reshape(b, h * s, -1)
            scores = ((folded @ stored.transpose(-1, -2)).view(b, h, s, n)
                      + (state * b_k).sum(-1, keepdim=True)) * self.scale
            if pad is not None:
                scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
            return self._normalize(scores)

        def read(a: Tensor, w: Tensor, bias: Tensor) -> Tensor:
            pooled = (a.reshape(b, h * s, n) @ stored).view(b, h, s, -1)
            return torch.einsum("bhse,hde->bhsd", pooled, w) + a.sum(-1, keepdim=True) * bias

        for _ in range(self.update_steps - 1):
            q = read(weights_of(q), w_k, b_k)
        weights = weights_of(q)
        return read(self.dropout(weights), w_v, b_v), weights

    def forward(self, R: Tensor, Y: Tensor, key_padding_mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """R: (B, S, d_model) state patterns; Y: (B, N, d_model) stored patterns;
        key_padding_mask: (B, N) bool, True marks padding. Returns (B, S, d_model) [and A (B, H, S, N)]."""
        q = self._split(self.q_proj(self.norm_state(R)))
        stored = self.norm_stored(Y)
        if self.folds_stored_projection(R.shape[1]):
            z, weights = self._folded_association(q, stored, key_padding_mask)
            out = self.out_proj(z.transpose(1, 2).reshape(R.shape[0], R.shape[1], -1))
            return (out, weights) if return_weights else out
        k = self._split(self.k_proj(stored))
        v = self._split(self.v_proj(stored))
        if self.update_steps is None:
            q = self._fixed_point_queries(q, k, key_padding_mask)
        else:
            for _ in range(self.update_steps - 1):
                q = self._weights(q, k, key_padding_mask) @ k
        weights = self._weights(q, k, key_padding_mask)
        z = self.dropout(weights) @ v
        out = self.out_proj(z.transpose(1, 2).reshape(R.shape[0], R.shape[1], -1))
        return (out, weights) if return_weights else out


class HopfieldPooling(nn.Module):
    """Pool a set of patterns into ``num_pattern`` vectors with learned query (state) patterns.

    Signature of Hu et al. (2023): ``HopfieldPooling(d_model, n_heads, mix, update_steps, dropout, mode,
    scale, num_pattern)``; extra keyword arguments (``alpha``, ``k``, ``normalize_patterns``) go to
    ``Hopfield``. Input (B, N, d_model), optional key_padding_mask (B, N) with True = padding;
    output (B, num_pattern, d_model).
    """

    def __init__(self, d_model: int, n_heads: int = 1, mix: bool = True, update_steps: int | None = 1,
                 dropout: float = 0.0, mode: str = "softmax", scale: float | None = None,
                 num_pattern: int = 1, **kwargs) -> None:
        super().__init__()
        self.query = nn.Parameter(0.02 * torch.randn(1, num_pattern, d_model))
        self.hopfield = Hopfield(d_model, n_heads=n_heads, mode=mode, scale=scale,
                                 update_steps=update_steps, dropout=dropout, mix=mix, **kwargs)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        queries = self.query.expand(x.shape[0], -1, -1)
        return self.hopfield(queries, x, key_padding_mask=key_padding_mask, return_weights=return_weights)


class HopfieldLayer(nn.Module):
    """Associate inputs with ``num_stored`` trainable stored patterns (a learned lookup table).

    Keys and values are the trainable stored patterns, the state patterns are the input
    (Ramsauer et al., ``HopfieldLayer``). Input (B, S, d_model) -> output (B, S, d_model).
    """

    def __init__(self, d_model: int, n_heads: int = 1, num_stored: int = 16, mode: str = "softmax",
                 scale: float | None = None, update_steps: int | None = 1, dropout: float = 0.0,
                 mix: bool = True, **kwargs) -> None:
        super().__init__()
        self.stored = nn.Parameter(torch.randn(1, num_stored, d_model) / math.sqrt(d_model))
        self.hopfield = Hopfield(d_model, n_heads=n_heads, mode=mode, scale=scale,
                                 update_steps=update_steps, dropout=dropout, mix=mix, **kwargs)

    def forward(self, R: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return self.hopfield(R, self.stored.expand(R.shape[0], -1, -1), return_weights=return_weights)
