"""Train many small MIL bag classifiers at once along a *model axis*.

The real-world MIL protocol (``real_world_mil.py``) trains ~43,000 tiny models (grid x folds x seeds).
One model per process step wastes the time in Python and Ray overhead, so here M models of one
architecture *shape* (embedding dims, embedding layers, pooling width, heads) are stacked along a
leading axis and trained together with batched matmuls; everything else may differ per model:
learning rate, lr decay, Hopfield scale beta, dropout, bag dropout, training data (fold / seed), init.

The batched model computes exactly the function of ``reference_model`` (a ``training.BagClassifier``
with ``layers.HopfieldPooling``) for each model m:

    h   = [Linear_E->w]( [ReLU(Linear(.))]^L (x) )                  per instance (the embedding; the
                                                                  last Linear only if ``emb_proj``)
    h_n = h_n * keep_bn / (1 - r_m), keep_bn ~ Bernoulli(1 - r_m)   bag dropout (training only): instance n
                                                                  of bag b zeroed whole with rate r_m
    k,v = LN(h) W_K + b_K,  LN(h) W_V + b_V;   q = xi W_Q + b_Q    (xi: learned query pattern;
                                                                  W_Q, W_K, W_V: w -> H * head_dim)
    A   = y_Omega(beta_m q k^T / per head) with padding -> weight 0,   z = dropout_m(A) v
    out = Linear_w->1( LN( GELU( z W_O + b_O ) ) )                  one logit per bag (W_O: H*head_dim -> w)

(``test_real_world_mil.py`` checks batched forward == M separate reference forwards, and one
optimizer step == torch.optim.AdamW + clip_grad_norm_ per model.) The normalization y_Omega is
``sparsemax.get_map(mode)``, the same map ``layers.Hopfield`` uses. A training step pads its bags to the
longest one (``BagGatherer``), or, for bags of very different lengths, passes only the real instances
through the embedding, bag dropout, LN, scores and pooled sums (``RaggedBagGatherer``, ``RaggedBags``; tested equal
to float rounding); only the normalization y_Omega reads the padded grid of scores.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sparsemax
import training

try:  # fused single-pass CPU AdamW kernels (BatchedAdamW); without numba the eager torch path runs
    import numba
    from numba.core import types as _nb_types
    from numba.extending import intrinsic as _nb_intrinsic
except ImportError:  # pragma: no cover - numba is in requirements.txt
    numba = None


# --------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Architecture shape shared by all models of one batch (parameter tensor sizes)."""

    d_in: int
    emb_dims: int
    emb_layers: int
    width: int  # pooling width d_model of HopfieldPooling (the embedding width it reads)
    n_heads: int
    head_dim: int | None = None  # width per head (None: width // n_heads); q/k/v map w -> n_heads * head_dim
    emb_proj: bool = True  # end the embedding with Linear(emb_dims -> width); False: width = emb_dims
    lenet: bool = False  # instances are 28 x 28 images, first through LeNet's convolutions (d_in = 800)

    def __post_init__(self) -> None:
        if self.head_dim is None and self.width % self.n_heads:
            raise ValueError(f"width {self.width} must be divisible by n_heads {self.n_heads} (or give head_dim)")
        if not self.emb_proj and (self.emb_layers < 1 or self.width != self.emb_dims):
            raise ValueError("emb_proj=False needs emb_layers >= 1 and width == emb_dims")
        if self.lenet and self.d_in != LENET_FEATURES:
            raise ValueError(f"lenet=True needs d_in={LENET_FEATURES} (the convolutions' output)")

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.n_heads

    @property
    def inner(self) -> int:
        """Width of the heads' association space, n_heads * d_head."""
        return self.n_heads * self.d_head


# LeNet convolutions (Ilse et al. 2018; ``mnist_mil_main.lenet_encoder``): (out, in, kernel) per layer
LENET_CONVS = ((20, 1, 5), (50, 20, 5))
LENET_FEATURES = 50 * 4 * 4


def instance_encoder(d_in: int, emb_dims: int, emb_layers: int, width: int, emb_proj: bool = True) -> nn.Sequential:
    """Instance embedding: ``emb_layers`` x [Linear(., emb_dims), ReLU], then (if ``emb_proj``)
    Linear(emb_dims, width). Without it this is Hu et al.'s embedding (pooling reads emb_dims)."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(emb_layers):
        layers += [nn.Linear(d, emb_dims), nn.ReLU()]
        d = emb_dims
    if emb_proj:
        layers.append(nn.Linear(d, width))
    return nn.Sequential(*layers)


class InstanceDropout(nn.Module):
    """Bag dropout: in training, each instance embedding (a row of (rows, d)) is zeroed whole with
    probability ``p`` and the kept ones are scaled by 1 / (1 - p) -- ``nn.Dropout2d`` on a (B, N, d) bag
    batch, which treats dim 1 (the instances) as channels (the ``bag_dropout`` of an hflayers-based MIL
    script, see ``real_world_mil.py``). The instance stays in the bag (the pooling still attends to it).
    Draws from ``generator`` (None: torch's default); in ``reference_model`` it sees only the real
    (unpadded) instances, so its masks equal the batched model's for bags without padding."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"bag dropout rate {p} must lie in [0, 1)")
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[:-1], generator=self.generator, dtype=x.dtype, device=x.device) >= self.p
        return x * keep.unsqueeze(-1) / (1 - self.p)


def reference_model(shape: Shape, mode: str, scale: float, dropout: float, bag_dropout: float = 0.0,
                    **map_params) -> training.BagClassifier:
    """The unbatched model: ``training.BagClassifier`` with the instance encoder and HopfieldPooling;
    ``bag_dropout`` > 0 ends the encoder with ``InstanceDropout(bag_dropout)`` (before ``norm_in``)."""
    encoder = instance_encoder(shape.d_in, shape.emb_dims, shape.emb_layers, shape.width, shape.emb_proj)
    if bag_dropout > 0:
        encoder.append(InstanceDropout(bag_dropout))
    return training.BagClassifier(encoder, d_model=shape.width, num_pattern=1, n_heads=shape.n_heads,
                                  mix=True, update_steps=1, dropout=dropout, mode=mode, scale=scale,
                                  head_dim=shape.d_head, **map_params)


def _linear_names(shape: Shape) -> list[str]:
    return [f"enc{i}" for i in range(shape.emb_layers + int(shape.emb_proj))] + ["q", "k", "v", "o", "head"]


def _reference_tensors(model: training.BagClassifier) -> dict[str, Tensor]:
    """Parameters of a reference model under the batched names (Linear weights as (in, out))."""
    linears = [m for m in model.encoder if isinstance(m, nn.Linear)]
    hop = model.pooling.hopfield
    linears += [hop.q_proj, hop.k_proj, hop.v_proj, hop.out_proj, model.head]
    names = [f"enc{i}" for i in range(len(linears) - 5)] + ["q", "k", "v", "o", "head"]
    tensors = {}
    for name, lin in zip(names, linears):
        tensors[f"{name}.w"] = lin.weight.detach().t()
        tensors[f"{name}.b"] = lin.bias.detach()
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        tensors[f"conv{i}.w"], tensors[f"conv{i}.b"] = conv.weight.detach(), conv.bias.detach()
    tensors["query"] = model.pooling.query.detach()[0, 0]
    for ln in ("norm_in", "norm_out"):
        tensors[f"{ln}.w"] = getattr(model, ln).weight.detach()
        tensors[f"{ln}.b"] = getattr(model, ln).bias.detach()
    if hop.mode == "gsh":
        tensors["alpha_logit"] = hop.alpha_logit.detach()
    return tensors


class BatchedBagClassifier(nn.Module):
    """M ``reference_model``s of one ``Shape`` with stacked parameters (leading model axis).

    ``scale`` and ``dropout`` are (M,) tensors (one beta and one attention-dropout rate per model);
    ``bag_dropout`` (M,) (default 0): per-model rate of dropping whole instance embeddings in training
    (``InstanceDropout``); all zero = no random draw, the model of before bit for bit.
    forward(x (M, B, N, d_in), pad (M, B, N) True = padding) -> logits (M, B).
    """

    def __init__(self, params: dict[str, Tensor], shape: Shape, mode: str, scale: Tensor,
                 dropout: Tensor, map_params: dict | None = None, bag_dropout: Tensor | None = None) -> None:
        super().__init__()
        if mode not in sparsemax.MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(sparsemax.MODES)}")
        self.shape, self.mode, self.map_params = shape, mode, dict(map_params or {})
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v.contiguous())
                                        for k, v in params.items()})
        self.names = list(params)
        dtype = next(iter(params.values())).dtype
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("dropout_p", dropout.to(dtype))
        bag_dropout = torch.zeros_like(scale) if bag_dropout is None else bag_dropout
        if bag_dropout.shape != scale.shape or bool(((bag_dropout < 0) | (bag_dropout >= 1)).any()):
            raise ValueError("bag_dropout needs one rate in [0, 1) per model")
        self.register_buffer("bag_dropout_p", bag_dropout.to(dtype))
        self.generator: torch.Generator | None = None  # dropout randomness (set by the trainer)
        if mode == "gsh":
            self.map_params.pop("alpha", None)

    @property
    def num_models(self) -> int:
        return self.scale.shape[0]

    def p(self, name: str) -> Tensor:
        """Parameter ``name`` of all models, (M, *shape)."""
        return self.params[name.replace(".", "_")]

    def tensors(self) -> dict[str, Tensor]:
        """All parameters by name."""
        return {name: self.p(name) for name in self.names}

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_models(cls, models: Sequence[training.BagClassifier], shape: Shape) -> "BatchedBagClassifier":
        """Stack the parameters of reference models (same shape and mode) into one batched model."""
        hops = [m.pooling.hopfield for m in models]
        per_model = [_reference_tensors(m) for m in models]
        params = {k: torch.stack([t[k] for t in per_model]) for k in per_model[0]}
        scale = torch.tensor([h.scale for h in hops], dtype=params["query"].dtype)
        dropout = torch.tensor([h.dropout.p for h in hops], dtype=params["query"].dtype)
        bag = torch.tensor([next((e.p for e in m.encoder if isinstance(e, InstanceDropout)), 0.0) for m in models],
                           dtype=params["query"].dtype)
        return cls(params, shape, hops[0].mode, scale, dropout, hops[0].map_params, bag)

    @classmethod
    def initialized(cls, shape: Shape, mode: str, scale: Tensor, dropout: Tensor,
                    generators: Sequence[torch.Generator], map_params: dict | None = None,
                    bag_dropout: Tensor | None = None) -> "BatchedBagClassifier":
        """Fresh models, model m drawn with ``generators[m]`` from the reference model's init:
        Linear W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch default), query ~ 0.02 N(0, 1),
        LayerNorm (1, 0), gsh alpha_logit = logit(alpha0 - 1)."""
        dims = [(shape.d_in if i == 0 else shape.emb_dims, shape.emb_dims) for i in range(shape.emb_layers)]
        if shape.emb_proj:
            dims.append((shape.emb_dims if shape.emb_layers else shape.d_in, shape.width))
        dims += [(shape.width, shape.inner)] * 3 + [(shape.inner, shape.width), (shape.width, 1)]
        names = _linear_names(shape)
        per_model: list[dict[str, Tensor]] = []
        for gen in generators:
            tensors = {}
            for name, (d_in, d_out) in zip(names, dims):
                bound = 1.0 / math.sqrt(d_in)
                tensors[f"{name}.w"] = (torch.rand(d_in, d_out, generator=gen) * 2 - 1) * bound
                tensors[f"{name}.b"] = (torch.rand(d_out, generator=gen) * 2 - 1) * bound
            tensors["query"] = 0.02 * torch.randn(shape.width, generator=gen)
            for i, (c_out, c_in, kernel) in enumerate(LENET_CONVS if shape.lenet else ()):
                bound = 1.0 / math.sqrt(c_in * kernel * kernel)
                tensors[f"conv{i}.w"] = (torch.rand(c_out, c_in, kernel, kernel, generator=gen) * 2 - 1) * bound
                tensors[f"conv{i}.b"] = (torch.rand(c_out, generator=gen) * 2 - 1) * bound
            per_model.append(tensors)
        params = {k: torch.stack([t[k] for t in per_model]) for k in per_model[0]}
        m = len(generators)
        for ln in ("norm_in", "norm_out"):
            params[f"{ln}.w"] = torch.ones(m, shape.width)
            params[f"{ln}.b"] = torch.zeros(m, shape.width)
        if mode == "gsh":
            alpha0 = float(sparsemax.with_defaults(mode, map_params or {})["alpha"])
            params["alpha_logit"] = torch.full((m, shape.n_heads), math.log((alpha0 - 1) / (2 - alpha0)))
        return cls(params, shape, mode, scale, dropout, map_params, bag_dropout)

    def subset(self, keep: Tensor) -> "BatchedBagClassifier":
        """The models ``keep`` (indices along the model axis) as a new batched model (copied parameters)."""
        params = {name: self.p(name).detach()[keep].clone() for name in self.names}
        model = type(self)(params, self.shape, self.mode, self.scale[keep], self.dropout_p[keep], self.map_params,
                           self.bag_dropout_p[keep])
        model.generator = self.generator
        return model.train(self.training)

    # ----------------------------------------------------------------------------------------------
    def _linear(self, x: Tensor, name: str) -> Tensor:
        """x (M, ..., d_in) -> x W_m + b_m for each model m."""
        m = x.shape[0]
        flat = x.reshape(m, -1, x.shape[-1])
        out = torch.baddbmm(self.p(f"{name}.b").unsqueeze(1), flat, self.p(f"{name}.w"))
        return out.view(*x.shape[:-1], out.shape[-1])

    def _layer_norm(self, x: Tensor, name: str) -> Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=1e-5)
        expand = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return y * self.p(f"{name}.w").view(expand) + self.p(f"{name}.b").view(expand)

    def _normalize(self, scores: Tensor) -> Tensor:
        """y_Omega over the last dim of scores (M, B, H, N) (as ``layers.Hopfield._normalize``)."""
        if self.mode == "gsh":
            alpha = 1.0 + torch.sigmoid(self.p("alpha_logit"))
            return sparsemax.entmax(scores, alpha=alpha[:, None, :, None], dim=-1)
        return sparsemax.get_map(self.mode, **self.map_params)(scores)

    def pool(self, x: Tensor, pad: Tensor | None) -> Tensor:
        """Batched HopfieldPooling (one query, one update step): x (M, B, N, w) -> (M, B, w);
        heads of width d = ``shape.d_head`` (W_K, W_V: w x H d, W_O: H d x w).

        Same function as ``layers.Hopfield`` with R = the learned query, in a cheaper order: per head h
        (columns of block h: W_{K,h}, W_{V,h}, with q_h = (xi W_Q + b_Q)_h)

            score_hn = beta <x_n W_{K,h} + b_{K,h}, q_h> = beta (x_n u_h + c_h),  u_h = W_{K,h} q_h
            z_h      = sum_n A_hn (x_n W_{V,h} + b_{V,h}) = (sum_n A_hn x_n) W_{V,h} + (sum_n A_hn) b_{V,h}

        so the w x Hd key/value projections act once per bag instead of once per instance.
        """
        m, b, n, w = x.shape
        u, c = self._key_query()
        scores = torch.baddbmm(c.unsqueeze(1), x.reshape(m, b * n, w), u).view(m, b, n, self.shape.n_heads)
        scores = self.scale.view(m, 1, 1, 1) * scores.transpose(2, 3)  # (M, B, H, N)
        if pad is not None:
            scores = scores.masked_fill(pad[:, :, None, :], float("-inf"))
        weights = self._attention(scores)
        return self._pooled_output(weights @ x, weights)  # weights @ x: sum_n A_hn x_n, (M, B, H, w)

    def _pool_ragged(self, rows: Tensor, bags: "RaggedBags") -> Tensor:
        """``pool`` of the real instances only, rows (R, w) placed at ``bags.slot`` (M, B, N) -> (M, B, w):
        score_hn = beta (x_n u_h + c_h) per row with its model's u, c; A = y_Omega over the padded grid
        (M, B, H, N), -inf at padding, as ``pool``; then per bag g the segment sum over its rows

            pooled_gh = sum_{n in g} A_hn x_n    (instead of a matmul over the padded grid)."""
        m, b, n = bags.slot.shape
        h = self.shape.n_heads
        u, c = self._key_query()
        scores = torch.bmm(rows.unsqueeze(1), u[bags.owner]).squeeze(1) + c[bags.owner]
        scores = self.scale[bags.owner].unsqueeze(1) * scores  # (R, H)
        grid = torch.cat([scores, scores.new_full((1, h), float("-inf"))]).index_select(0, bags.slot.reshape(-1))
        weights = self._attention(grid.view(m, b, n, h).transpose(2, 3))  # (M, B, H, N)
        row_weights = weights.transpose(2, 3).reshape(-1, h)[bags.real.reshape(-1)]  # (R, H), A_hn of each real instance
        bag_of_row = torch.repeat_interleave(torch.arange(m * b, device=rows.device), bags.real.view(m * b, n).sum(1))
        terms = row_weights.unsqueeze(-1) * rows.unsqueeze(1)  # (R, H, w): A_hn x_n
        pooled = rows.new_zeros(m * b, h, rows.shape[1]).index_add(0, bag_of_row, terms)
        return self._pooled_output(pooled.view(m, b, h, -1), weights)

    def _key_query(self) -> tuple[Tensor, Tensor]:
        """The learned query folded into the key projection: u (M, w, H), u_h = W_{K,h} q_h;
        c (M, H), c_h = <b_{K,h}, q_h>."""
        m, h, d = self.num_models, self.shape.n_heads, self.shape.d_head
        q = torch.baddbmm(self.p("q.b").unsqueeze(1), self.p("query").unsqueeze(1), self.p("q.w")).view(m, h, d)
        u = (self.p("k.w").view(m, -1, h, d) * q.unsqueeze(1)).sum(-1)
        return u, torch.einsum("mhd,mhd->mh", self.p("k.b").view(m, h, d), q)

    def _attention(self, scores: Tensor) -> Tensor:
        """A = y_Omega(scores) (M, B, H, N), in training with dropout rate p_m (kept weights x 1/(1 - p_m))."""
        weights = self._normalize(scores)
        if self.training and bool((self.dropout_p > 0).any()):
            p = self.dropout_p.view(-1, 1, 1, 1)
            keep = torch.rand(weights.shape, generator=self.generator, dtype=weights.dtype) >= p
            weights = weights * keep / (1 - p)
        return weights

    def _pooled_output(self, pooled: Tensor, weights: Tensor) -> Tensor:
        """pooled (M, B, H, w) = sum_n A_hn x_n -> (M, B, w):
        z_h = pooled_h W_{V,h} + (sum_n A_hn) b_{V,h},  out = z W_O + b_O."""
        m, b, h, w = pooled.shape
        d = self.shape.d_head
        # head h reads its own column block of W_V
        z = torch.einsum("mbhw,mwhd->mbhd", pooled, self.p("v.w").view(m, w, h, d))  # (M, B, H, d)
        z = z + weights.sum(-1, keepdim=True) * self.p("v.b").view(m, 1, h, d)
        return self._linear(z.reshape(m, b, h * d), "o")

    def _lenet(self, x: Tensor) -> Tensor:
        """LeNet convolutions of every model as grouped convolutions: x (M, B, N, 28, 28) -> (M, B, N, 800),
        model m's images on input channel m (conv - maxpool 2 - ReLU, twice, as ``mnist_mil_main.lenet_encoder``;
        flattened channel-major)."""
        m, b, n = x.shape[:3]
        h = x.reshape(m, b * n, 28, 28).transpose(0, 1)  # (B N, M, 28, 28): one channel per model
        for i in range(len(LENET_CONVS)):
            w = self.p(f"conv{i}.w")
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), self.p(f"conv{i}.b").reshape(-1), groups=m)
            h = torch.relu(F.max_pool2d(h, 2))
        return h.reshape(b * n, m, -1).transpose(0, 1).reshape(m, b, n, -1)

    def _embed(self, x: Tensor) -> Tensor:
        """Pooling input of padded bags: norm_in(bag dropout(encoder(x))), x (M, B, N, d_in) -> (M, B, N, w);
        padded instances are encoded too (their pooling weight is exactly 0)."""
        h = self._lenet(x) if self.shape.lenet else x
        for i in range(self.shape.emb_layers):
            h = torch.relu(self._linear(h, f"enc{i}"))
        if self.shape.emb_proj:
            h = self._linear(h, f"enc{self.shape.emb_layers}")
        return self._layer_norm(self._bag_dropout(h), "norm_in")

    def _embed_ragged(self, bags: "RaggedBags") -> Tensor:
        """The same of only the real instances: model m's rows x_m (``bags.counts[m]``, d_in) go through its
        own layers (x_m W_m + b_m, one matmul per model and layer instead of one batched matmul over padded
        bags), bag dropout and norm_in -> rows (R, w) in ``bags.x``'s order (``_pool_ragged`` reads them)."""
        if self.shape.lenet:
            raise ValueError("ragged bags hold feature vectors; LeNet shapes take padded image bags")
        names = [f"enc{i}" for i in range(self.shape.emb_layers + int(self.shape.emb_proj))]
        layers = [(self.p(f"{n}.w").unbind(0), self.p(f"{n}.b").unbind(0)) for n in names]
        rows = []
        for m, h in enumerate(bags.x.split(bags.counts)):
            for i, (weights, biases) in enumerate(layers):
                h = torch.addmm(biases[m], h, weights[m])
                h = torch.relu(h) if i < self.shape.emb_layers else h
            rows.append(h)
        h = self._bag_dropout(torch.cat(rows), bags.real)
        return F.layer_norm(h, h.shape[-1:], eps=1e-5) * self.p("norm_in.w")[bags.owner] + self.p("norm_in.b")[bags.owner]

    def _bag_dropout(self, h: Tensor, real: Tensor | None = None) -> Tensor:
        """Training: instance embedding n of bag b of model m zeroed whole with rate r_m, kept ones x 1/(1 - r_m)
        (``InstanceDropout`` per model); h (M, B, N, w), or ragged rows (R, w) of the instances that ``real``
        (M, B, N) marks: the mask is drawn over (M, B, N) either way, so both layouts drop the same instances."""
        if not self.training or not bool((self.bag_dropout_p > 0).any()):
            return h
        grid = h.shape[:-1] if real is None else real.shape
        p = self.bag_dropout_p.view(-1, 1, 1)
        keep = torch.rand(grid, generator=self.generator, dtype=h.dtype, device=h.device) >= p
        if real is None:
            return h * keep.unsqueeze(-1) / (1 - p).unsqueeze(-1)
        return h * keep[real].unsqueeze(-1) / (1 - p.expand(grid)[real]).unsqueeze(-1)

    def forward(self, x: Tensor | "RaggedBags", pad: Tensor | None = None) -> Tensor:
        """x (M, B, N, d_in) instances (``lenet``: (M, B, N, 28, 28) images) or their ``RaggedBags``,
        pad (M, B, N) True = padding (``RaggedBags`` carry it in ``slot``) -> logits (M, B)."""
        if isinstance(x, RaggedBags):
            pooled = self._pool_ragged(self._embed_ragged(x), x)
        else:
            pooled = self.pool(self._embed(x), pad)
        return self._linear(self._layer_norm(F.gelu(pooled), "norm_out"), "head").squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Optimizer: AdamW + per-model gradient clipping, per-model learning rates
# --------------------------------------------------------------------------------------------------
if numba is not None:
    @_nb_intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c rounded once (llvm.fma). ATen's CPU ``lerp_`` is an explicit fma and its vectorized
        ``addcmul_`` is compiled to one, so using it at the same places reproduces torch's m and v bit for bit."""
        if not (isinstance(a, _nb_types.Float) and a == b == c):
            return None

        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return a(a, b, c), codegen

    @numba.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
    def _add_sum_squares(g: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
        """out_i += sum_j g_ij^2 for g (M, P), accumulated in float64 (reassociation allowed: a norm,
        vectorized; torch's own reduction order is unspecified too)."""
        for i in range(g.shape[0]):
            row = g[i]
            acc = 0.0
            for j in range(row.shape[0]):
                x = np.float64(row[j])
                acc += x * x
            out[i] += acc

    @numba.njit(cache=True, fastmath=False)
    def _adamw_scalars(lr: np.ndarray, steps: np.ndarray, weight_decay: float, beta1: float, beta2: float,
                       decay: np.ndarray, neg_step: np.ndarray, bias2_sqrt: np.ndarray) -> None:  # pragma: no cover
        """Per-model scalars of torch's AdamW step in float64 (as torch computes them in Python), rounded
        to the parameter dtype on store: decay = 1 - lr wd, neg_step = -lr / (1 - b1^t),
        bias2_sqrt = (1 - b2^t)^0.5."""
        for i in range(lr.shape[0]):
            lr_i = np.float64(lr[i])
            t = max(np.float64(steps[i]), 1.0)
            decay[i] = 1.0 - lr_i * weight_decay
            neg_step[i] = -(lr_i / (1.0 - beta1 ** t))
            bias2_sqrt[i] = (1.0 - beta2 ** t) ** 0.5

    @numba.njit(cache=True, fastmath=False, error_model="numpy")  # numpy: no zero-division branch
    def _adamw_update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, coef: np.ndarray,
                      decay: np.ndarray, neg_step: np.ndarray, bias2_sqrt: np.ndarray, active: np.ndarray,
                      consts: np.ndarray) -> None:  # pragma: no cover - compiled
        """One pass of clipped AdamW over p, g, m, v (M, P) for the models with active_i, in torch's op
        order and rounding (consts = [1 - b1, b2, 1 - b2, eps] in the dtype of p):

            g' = g c_i;  m <- fma(1 - b1, g' - m, m)  (lerp);  v <- fma((1 - b2) g', g', v b2)  (addcmul)
            p <- p decay_i + (neg_step_i m) / (sqrt(v) / bias2_sqrt_i + eps)  (mul_, addcdiv_)
        """
        w1, b2, w2, eps = consts[0], consts[1], consts[2], consts[3]
        for i in range(p.shape[0]):
            if not active[i]:
                continue
            c, d, s, b = coef[i], decay[i], neg_step[i], bias2_sqrt[i]
            pi, gi, mi, vi = p[i], g[i], m[i], v[i]
            for j in range(pi.shape[0]):
                grad = gi[j] * c
                mj = _fma(w1, grad - mi[j], mi[j])
                vj = _fma(w2 * grad, grad, vi[j] * b2)
                mi[j] = mj
                vi[j] = vj
                pi[j] = pi[j] * d + s * mj / (np.sqrt(vj) / b + eps)


class BatchedAdamW:
    """``torch.optim.AdamW`` (amsgrad=False) applied independently to each model of the model axis,
    after ``clip_grad_norm_(model_m.parameters(), clip)`` per model:

        g <- g * min(1, clip / (||g_m||_2 + 1e-6));  p <- p (1 - lr_m wd)
        m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
        p <- p - lr_m / (1-b1^t_m) * m / (sqrt(v) / sqrt(1-b2^t_m) + eps)

    ``lr`` is an (M,) tensor (change it for schedules); ``step(active)`` updates only models with
    active=True (their step count t_m advances), so models with fewer batches per epoch wait.

    On CPU with numba (``fused``, the default there) a step is two passes per parameter tensor viewed
    as (M, P): the per-model sums of squares (clip norm), then one fused pass (``_adamw_update``) in
    torch's op order and rounding (m, v bitwise equal to torch.optim.AdamW; p to the last bit, since
    torch's CPU sqrt goes through MKL and is not always correctly rounded). Otherwise (GPU, no numba)
    the eager torch ops of ``_step_torch`` (~9 passes). The fused path leaves ``p.grad`` unclipped (the
    clipped gradient only lives inside the pass) and keeps numpy views of the parameters: create the
    optimizer after moving the model, and do not replace ``p.data``.
    """

    def __init__(self, params: Sequence[Tensor], lr: Tensor, weight_decay: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 grad_clip: float | None = 1.0, fused: bool | None = None) -> None:
        self.params = list(params)
        self.lr = lr.clone().to(self.params[0])
        self.weight_decay, self.betas, self.eps, self.grad_clip = weight_decay, betas, eps, grad_clip
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros_like(self.lr)
        can_fuse = (numba is not None and all(p.device.type == "cpu" and p.is_contiguous() for p in self.params)
                    and len({p.dtype for p in self.params}) == 1
                    and self.params[0].dtype in (torch.float32, torch.float64))
        if fused and not can_fuse:
            raise ValueError("fused=True needs numba and contiguous float32/float64 CPU parameters of one dtype")
        self.fused = can_fuse if fused is None else fused
        if self.fused:
            # (M, P) numpy views sharing memory with each parameter and its two moments
            self._flat = [tuple(t.detach().view(t.shape[0], -1).numpy() for t in trio)
                          for trio in zip(self.params, self.exp_avg, self.exp_avg_sq)]
            dtype = self._flat[0][0].dtype
            b1, b2 = betas
            self._consts = np.array([1 - b1, b2, 1 - b2, eps], dtype=dtype)
            self._scalars = np.zeros((3, self.lr.shape[0]), dtype=dtype)  # decay, neg_step, bias2_sqrt

    def _view(self, t: Tensor, p: Tensor) -> Tensor:
        return t.view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def grad_norms(self) -> Tensor:
        """Per-model gradient norm ||g_m||_2 over all parameters, (M,) (missing grads count as 0)."""
        if self.fused:
            sums = np.zeros(self.lr.shape[0])
            for p in self.params:
                if p.grad is not None:
                    _add_sum_squares(p.grad.detach().contiguous().view(p.shape[0], -1).numpy(), sums)
            return torch.from_numpy(np.sqrt(sums)).to(self.lr.dtype)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]).norm(dim=0)

    def _clip_coef(self) -> Tensor:
        """min(1, clip / (||g_m|| + 1e-6)) per model (torch.nn.utils.clip_grad_norm_); 1 without clipping."""
        if self.grad_clip is None:
            return torch.ones_like(self.lr)
        return (self.grad_clip / (self.grad_norms() + 1e-6)).clamp(max=1.0)

    @torch.no_grad()
    def step(self, active: Tensor | None = None) -> None:
        if self.fused:
            self._step_fused(active)
        else:
            self._step_torch(active)

    def _step_fused(self, active: Tensor | None) -> None:
        """Clip coefficients, per-model scalars, then one ``_adamw_update`` pass per parameter tensor."""
        coef = self._clip_coef().numpy()
        act = np.ones(self.lr.shape[0], dtype=np.bool_) if active is None else active.cpu().numpy()
        self.steps += torch.from_numpy(act).to(self.steps.dtype)
        decay, neg_step, bias2_sqrt = self._scalars
        b1, b2 = self.betas
        _adamw_scalars(self.lr.numpy(), self.steps.numpy(), float(self.weight_decay), float(b1), float(b2),
                       decay, neg_step, bias2_sqrt)
        for param, (p, m, v) in zip(self.params, self._flat):
            g = param.grad
            g = np.zeros_like(p) if g is None else g.detach().contiguous().view(p.shape).numpy()
            _adamw_update(p, g, m, v, coef, decay, neg_step, bias2_sqrt, act, self._consts)

    def _step_torch(self, active: Tensor | None) -> None:
        """Eager torch ops (any device): ~9 element-wise passes per parameter tensor."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.grad_clip is not None:
            coef = self._clip_coef()
            for g in grads:
                g.mul_(self._view(coef, g))
        act = torch.ones_like(self.lr, dtype=torch.bool) if active is None else active
        all_active = bool(act.all())
        self.steps += act.to(self.steps.dtype)
        b1, b2 = self.betas
        # bias corrections in float64 as torch does (1 - 0.999^t cancels badly in float32: 1e-5 relative)
        t = self.steps.double().clamp(min=1)
        step_size = (self.lr.double() / (1 - b1 ** t)).to(self.lr.dtype)
        bias2_sqrt = (1 - b2 ** t).sqrt().to(self.lr.dtype)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            if all_active:  # in place (the common case)
                new_p, new_m, new_v = p, m, v
                new_p.mul_(1 - self._view(self.lr * self.weight_decay, p))
                new_m.lerp_(g, 1 - b1)
                new_v.mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                new_p = p * (1 - self._view(self.lr * self.weight_decay, p))
                new_m = m.lerp(g, 1 - b1)
                new_v = v * b2 + (1 - b2) * g * g
            # m / (sqrt(v) / s2 + eps) * step = m / (sqrt(v) + eps s2) * (step s2), s2 = sqrt(1 - b2^t)
            denom = new_v.sqrt().add_(self._view(self.eps * bias2_sqrt, p))
            update = torch.div(new_m, denom, out=denom).mul_(self._view(step_size * bias2_sqrt, p))
            if all_active:
                p.sub_(update)
            else:
                a = self._view(act, p)
                p.copy_(torch.where(a, new_p - update, p))
                m.copy_(torch.where(a, new_m, m))
                v.copy_(torch.where(a, new_v, v))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def subset(self, params: Sequence[Tensor], keep: Tensor) -> "BatchedAdamW":
        """This optimizer restricted to the models ``keep``, for ``params`` = those models' parameters
        (``BatchedBagClassifier.subset``): moments, step counts and learning rates carried over."""
        new = BatchedAdamW(params, self.lr[keep], self.weight_decay, self.betas, self.eps, self.grad_clip,
                           fused=self.fused)
        with torch.no_grad():
            for dst, src in ((new.exp_avg, self.exp_avg), (new.exp_avg_sq, self.exp_avg_sq)):
                for d, t in zip(dst, src):
                    d.copy_(t[keep])
            new.steps.copy_(self.steps[keep])
        return new


# --------------------------------------------------------------------------------------------------
# Data and metrics
# --------------------------------------------------------------------------------------------------
def pad_dataset(bags: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Bags (n_i, d) -> padded (n_bags, N_max, d), lengths (n_bags,), pad mask (n_bags, N_max)."""
    lengths = torch.tensor([len(b) for b in bags])
    padded = torch.zeros(len(bags), int(lengths.max()), bags[0].shape[1], dtype=bags[0].dtype)
    for i, b in enumerate(bags):
        padded[i, :len(b)] = b
    pad = torch.arange(padded.shape[1])[None] >= lengths[:, None]
    return padded, lengths, pad


def gather_bags(data: tuple[Tensor, Tensor, Tensor], idx: Tensor,
                standardize: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Bags idx (M, B) -> instances (M, B, N, d) and padding mask (M, B, N), N = max length used.

    ``standardize = (mean, std)``, each (M, d): model m sees (x - mean_m) / std_m (padding stays 0)."""
    padded, lengths, pad = data
    n = int(lengths[idx].max())
    x, mask = padded[:, :n][idx], pad[:, :n][idx]
    if standardize is not None:
        mean, std = standardize
        x = ((x - mean[:, None, None]) / std[:, None, None]).masked_fill(mask.unsqueeze(-1), 0.0)
    return x, mask


def _fold_tables(values: Tensor, standardize: tuple[Tensor, Tensor], max_bytes: float,
                 pad: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """One standardized copy of ``values`` (..., d) per distinct row u of ``standardize = (mean, std)``
    (M, d), the same element-wise ops as ``gather_bags``:

        tables[u] = (values - mean_u) / std_u   (positions where ``pad`` is True -> 0);   group (M,): u of model m

    Returns (None, None) when the tables would take more than ``max_bytes``."""
    mean, std = standardize
    rows, group = torch.unique(torch.cat([mean, std], 1), dim=0, return_inverse=True)
    if rows.shape[0] * values.numel() * torch.promote_types(values.dtype, mean.dtype).itemsize > max_bytes:
        return None, None
    d = mean.shape[1]
    per_row = (rows.shape[0],) + (1,) * (values.dim() - 1) + (d,)
    tables = (values.unsqueeze(0) - rows[:, :d].reshape(per_row)) / rows[:, d:].reshape(per_row)
    return (tables if pad is None else tables.masked_fill(pad[None, ..., None], 0.0)), group


class BagGatherer:
    """``gather_bags`` for repeated calls: the standardized dataset is computed once per distinct
    (mean, std) row (one per fold; ``max_bytes`` bounds the table, else each call standardizes as
    ``gather_bags`` does), and bags are copied into one reused buffer (fresh large tensors cost page faults).

        table_u = (padded - mean_u) / std_u with padding -> 0;   x[m, j] = table_{u(m)}[idx[m, j], :N]

    the same element-wise ops as ``gather_bags``, so the values are identical. The returned x is a view
    of the buffer: valid until the next call.
    """

    def __init__(self, data: tuple[Tensor, Tensor, Tensor], standardize: tuple[Tensor, Tensor] | None = None,
                 max_bytes: float = 2 ** 28) -> None:
        padded, self.lengths, self.pad = data
        self.data, self.standardize, self.group = data, standardize, None
        table = padded.unsqueeze(0)
        if standardize is not None:
            table, self.group = _fold_tables(padded, standardize, max_bytes, pad=self.pad)
        self.n_bags = padded.shape[0]
        self.flat = None if table is None else table.reshape(-1, *padded.shape[1:])
        self.buffer = torch.empty(0, dtype=padded.dtype if table is None else table.dtype, device=padded.device)

    def __call__(self, idx: Tensor, models: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Bags idx (M', B) -> instances (M', B, N, d), padding mask (M', B, N), N = max length used;
        row j of idx belongs to model ``models[j]`` (default: model j)."""
        if self.flat is None:
            standardize = self.standardize
            if standardize is not None and models is not None:
                standardize = tuple(t[models] for t in standardize)
            return gather_bags(self.data, idx, standardize)
        m, b = idx.shape
        n, d = int(self.lengths[idx].max()), self.flat.shape[-1]
        group = None if self.group is None else (self.group if models is None else self.group[models])
        rows = idx if group is None else group[:, None] * self.n_bags + idx
        if self.buffer.numel() < m * b * n * d:
            self.buffer = torch.empty(m * b * self.flat.shape[1] * d, dtype=self.buffer.dtype, device=idx.device)
        x = self.buffer[:m * b * n * d].view(m * b, n, d)
        torch.index_select(self.flat[:, :n], 0, rows.reshape(-1), out=x)
        return x.view(m, b, n, d), self.pad[:, :n][idx]


@dataclass(frozen=True)
class RaggedBags:
    """Instances of M models' bag batches (M, B) without padding: ``x`` (R, d) holds model 0's rows, then
    model 1's, ... (``counts[m]`` rows each: its bags in order, each bag's instances in order; ``owner`` (R,)
    the model of each row); ``slot`` (M, B, N) is the row of x holding instance n of bag b, R at padding,
    and ``real`` (M, B, N) = slot < R marks the real instances (``BatchedBagClassifier._embed_ragged``)."""

    x: Tensor
    counts: list[int]
    owner: Tensor
    slot: Tensor
    real: Tensor


class RaggedBagGatherer:
    """``BagGatherer`` without padding rows: bags idx (M', B) -> (``RaggedBags``, pad (M', B, N)), the same
    standardized values (the same element-wise ops), for data whose bags differ much in length.

        table_u = (instances - mean_u) / std_u   (n_instances, d), built once per distinct (mean, std) row
        (``max_bytes`` bounds the tables, else each call standardizes its rows)
    """

    def __init__(self, data: tuple[Tensor, Tensor, Tensor], standardize: tuple[Tensor, Tensor] | None = None,
                 max_bytes: float = 2 ** 28) -> None:
        padded, self.lengths, self.pad = data
        if padded.dim() != 3:
            raise ValueError(f"ragged bags need feature vectors (n_bags, N, d), got shape {tuple(padded.shape)}")
        self.instances = padded[~self.pad]  # (n_instances, d), bag by bag
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.standardize, self.group, self.table = standardize, None, None
        if standardize is None:
            return
        tables, self.group = _fold_tables(self.instances, standardize, max_bytes)
        if tables is not None:
            self.table = tables.reshape(-1, self.instances.shape[1])

    def __call__(self, idx: Tensor, models: Tensor | None = None) -> tuple[RaggedBags, Tensor]:
        """Row j of idx belongs to model ``models[j]`` (default: model j)."""
        m, b = idx.shape
        n = int(self.lengths[idx].max())
        pad = self.pad[:, :n][idx]
        real = ~pad
        source = (self.offsets[idx].unsqueeze(-1) + torch.arange(n, device=idx.device))[real]
        counts = real.reshape(m, -1).sum(1)
        slot = torch.full((m, b, n), len(source), dtype=torch.long, device=idx.device)
        slot[real] = torch.arange(len(source), device=idx.device)
        owner = torch.repeat_interleave(torch.arange(m, device=idx.device), counts)
        models = owner if models is None else models[owner]
        if self.table is not None:
            x = self.table[self.group[models] * len(self.instances) + source]
        elif self.standardize is not None:
            mean, std = self.standardize
            x = (self.instances[source] - mean[models]) / std[models]
        else:
            x = self.instances[source]
        return RaggedBags(x, counts.tolist(), owner, slot, real), pad


def batched_auc(scores: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """ROC AUC per row: P(s_pos > s_neg) + 1/2 P(s_pos = s_neg) over valid entries (Mann-Whitney).

    scores, labels (0/1), valid: (M, n). NaN for a row without both classes.
    """
    pos = (labels > 0.5) & valid
    neg = (labels < 0.5) & valid
    diff = scores[:, :, None] - scores[:, None, :]  # (M, i, j) = s_i - s_j
    pair = (pos[:, :, None] & neg[:, None, :]).to(scores.dtype)
    wins = ((diff > 0).to(scores.dtype) + 0.5 * (diff == 0).to(scores.dtype)) * pair
    n_pairs = pair.sum((1, 2))
    return torch.where(n_pairs > 0, wins.sum((1, 2)) / n_pairs.clamp(min=1), torch.full_like(n_pairs, math.nan))


def _index_table(sets: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Ragged index lists -> (M, n_max) table (padded with the row's first index) and validity mask."""
    n_max = max(len(s) for s in sets)
    table = torch.zeros(len(sets), n_max, dtype=torch.long)
    valid = torch.zeros(len(sets), n_max, dtype=torch.bool)
    for m, s in enumerate(sets):
        table[m, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        table[m, len(s):] = s[0]
        valid[m, :len(s)] = True
    return table, valid


@torch.no_grad()
def evaluate(model: BatchedBagClassifier, data: tuple[Tensor, Tensor, Tensor], labels: Tensor,
             sets: Sequence[Sequence[int]], standardize: tuple[Tensor, Tensor] | None = None,
             chunk: int = 16, gather: Callable | None = None) -> dict[str, Tensor]:
    """Eval-mode loss (mean BCE), accuracy (logit > 0) and AUC of each model on its own bag set
    (``gather``: a ``BagGatherer`` of the same data and standardization, reused across calls)."""
    model.eval()
    gather = gather or BagGatherer(data, standardize)
    table, valid = (t.to(labels.device) for t in _index_table(sets))
    logits = torch.cat([training.full_precision(model(*gather(table[:, s:s + chunk])))
                        for s in range(0, table.shape[1], chunk)], dim=1)
    y = labels[table].to(logits.dtype)
    w = valid.to(logits.dtype)
    count = w.sum(1)
    loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum(1) / count
    acc = (((logits > 0).to(y.dtype) == y).to(y.dtype) * w).sum(1) / count
    return {"loss": loss, "acc": acc, "auc": batched_auc(logits, y, valid)}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stopping:
    """Early stopping and successive halving on validation metrics only (``train_batched``).

    patience: a model stops when its best validation score (AUC, ties: lower loss) has not improved for
        this many epochs (None: off; Hu et al.'s code used 5).
    rungs: epochs after which, within each group of models (``groups``, e.g. one outer fold's configs),
        only the best ``ceil(keep * n)`` of the group's n models by best validation score so far train on
        (those that stopped early count with their score). Empty: off.
    """

    patience: int | None = None
    rungs: tuple[int, ...] = ()
    keep: float = 1 / 3

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if not 0 < self.keep < 1:
            raise ValueError(f"keep must lie in (0, 1), got {self.keep}")
        if any(r < 1 for r in self.rungs) or list(self.rungs) != sorted(set(self.rungs)):
            raise ValueError(f"rungs must be increasing epochs >= 1, got {self.rungs}")

    @property
    def active(self) -> bool:
        return self.patience is not None or bool(self.rungs)


def _score_key(auc: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    return torch.nan_to_num(auc, nan=-1.0), torch.nan_to_num(loss, nan=math.inf)


def _halving_survivors(score: tuple[Tensor, Tensor], groups: Tensor, keep: float) -> Tensor:
    """Bool (M,): per group the best ceil(keep * n) models by (AUC desc, loss asc, index asc)."""
    auc, loss = score
    survive = torch.zeros_like(groups, dtype=torch.bool)
    for g in groups.unique():
        members = (groups == g).nonzero().squeeze(1).tolist()
        ranked = sorted(members, key=lambda i: (-float(auc[i]), float(loss[i]), i))
        survive[ranked[:math.ceil(keep * len(members))]] = True
    return survive


def train_batched(model: BatchedBagClassifier, data: tuple[Tensor, Tensor, Tensor], labels: Tensor,
                  train_sets: Sequence[Sequence[int]], eval_sets: dict[str, Sequence[Sequence[int]]],
                  lr: Tensor, lr_decay: Tensor, epochs: int, batch_size: int = 4,
                  weight_decay: float = 1e-4, grad_clip: float | None = 1.0,
                  generators: Sequence[torch.Generator] | None = None,
                  standardize: tuple[Tensor, Tensor] | None = None,
                  on_epoch: Callable[[int, dict], None] | None = None,
                  stopping: Stopping = Stopping(), groups: Tensor | None = None,
                  precision: str = "fp32", ragged: bool = False) -> dict[str, Tensor]:
    """Train model m on bags ``train_sets[m]`` (own shuffle from ``generators[m]``) with BCE-with-logits,
    AdamW(lr_m, weight_decay) + clip, lr_m <- lr_m * lr_decay_m after every epoch (Hu et al.); after
    each epoch evaluate every set of ``eval_sets`` (e.g. val, test) in eval mode. ``standardize``:
    per-model feature (mean, std), see ``gather_bags``; dropout draws from ``generators[0]``.
    ``stopping`` (early stopping, successive halving within ``groups``; it reads the ``val`` set only)
    removes stopped models from the stacked computation; their later epochs are NaN. ``precision``:
    autocast of the forward pass (``training.autocast``). ``ragged``: the encoder sees only the real
    instances (``RaggedBagGatherer``; the same function up to float rounding, faster where bags differ much
    in length), else padded bags (``BagGatherer``).

    Returns a dict of (epochs, M) tensors ``<set>_<loss|acc|auc>``.
    """
    m_total = model.num_models
    generators = list(generators or [torch.Generator().manual_seed(i) for i in range(m_total)])
    device = next(model.parameters()).device
    labels = labels.to(device)
    model.generator = generators[0]
    if device.type != "cpu":  # dropout masks are drawn on the device
        seed = int(torch.randint(2 ** 62, (1,), generator=generators[0]))
        model.generator = torch.Generator(device=device).manual_seed(seed)
    if stopping.active and "val" not in eval_sets:
        raise ValueError("early stopping / halving need a 'val' entry in eval_sets")
    groups = torch.zeros(m_total, dtype=torch.long) if groups is None else torch.as_tensor(groups)
    optimizer = BatchedAdamW(list(model.parameters()), lr, weight_decay, grad_clip=grad_clip)
    gather = (RaggedBagGatherer if ragged else BagGatherer)(data, standardize)
    decay = lr_decay.to(optimizer.lr)
    train_table = [torch.as_tensor(list(s), dtype=torch.long) for s in train_sets]
    eval_sets = {name: list(sets) for name, sets in eval_sets.items()}
    alive = torch.arange(m_total)  # models still training, in the order of the current model axis
    best = _score_key(torch.full((m_total,), math.nan), torch.full((m_total,), math.nan))
    since_best = torch.zeros(m_total, dtype=torch.long)
    history: dict[str, Tensor] = {}
    for epoch in range(1, epochs + 1):
        gather_alive = functools.partial(gather, models=alive)
        _train_epoch(model, optimizer, gather_alive, labels, [train_table[i] for i in alive.tolist()],
                     [generators[i] for i in alive.tolist()], batch_size, precision)
        optimizer.lr = optimizer.lr * decay[:len(alive)]
        metrics = {}
        for name, sets in eval_sets.items():
            with training.autocast(precision, device):
                values = evaluate(model, data, labels, [sets[i] for i in alive.tolist()], gather=gather_alive)
            for key, value in values.items():
                value = training.full_precision(value).cpu()
                full = history.setdefault(f"{name}_{key}", torch.full((epochs, m_total), math.nan, dtype=value.dtype))
                full[epoch - 1, alive] = value
                metrics[f"{name}_{key}"] = full[epoch - 1]
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if not stopping.active:
            continue
        keep = _still_training(stopping, epoch, metrics["val_auc"], metrics["val_loss"], alive, best, since_best,
                               groups)
        if not bool(keep.all()):
            alive, decay = alive[keep], decay[:len(keep)][keep]
            if not len(alive):
                break
            model = model.subset(keep.nonzero().squeeze(1))
            optimizer = optimizer.subset(list(model.parameters()), keep.nonzero().squeeze(1))
    return history


def _still_training(stopping: Stopping, epoch: int, val_auc: Tensor, val_loss: Tensor, alive: Tensor,
                    best: tuple[Tensor, Tensor], since_best: Tensor, groups: Tensor) -> Tensor:
    """Update the best validation scores of the ``alive`` models (in place) and return which of them train
    on: bool over ``alive``, False when patience ran out or a halving rung eliminated the model."""
    auc, loss = _score_key(val_auc[alive], val_loss[alive])
    better = (auc > best[0][alive]) | ((auc == best[0][alive]) & (loss < best[1][alive]))
    best[0][alive] = torch.where(better, auc, best[0][alive])
    best[1][alive] = torch.where(better, loss, best[1][alive])
    since_best[alive] = torch.where(better, 0, since_best[alive] + 1)
    keep = torch.ones(len(alive), dtype=torch.bool)
    if stopping.patience is not None:
        keep &= since_best[alive] < stopping.patience
    if epoch in stopping.rungs:
        keep &= _halving_survivors(best, groups, stopping.keep)[alive]
    return keep


def _train_epoch(model: BatchedBagClassifier, optimizer: BatchedAdamW, gather: Callable, labels: Tensor,
                 train_table: Sequence[Tensor], generators: Sequence[torch.Generator], batch_size: int,
                 precision: str) -> None:
    """One epoch: model m shuffles its own bags with its generator; models with fewer bags wait."""
    device = labels.device
    model.train()
    n_steps = int(math.ceil(max(len(t) for t in train_table) / batch_size))
    orders, valid = (t.to(device) for t in _index_table(
        [t[torch.randperm(len(t), generator=g)].tolist() for t, g in zip(train_table, generators)]))
    for step in range(n_steps):
        cols = slice(step * batch_size, (step + 1) * batch_size)
        idx, ok = orders[:, cols], valid[:, cols]
        x, pad = gather(idx)
        with training.autocast(precision, device):
            logits = training.full_precision(model(x, pad))
        y = labels[idx].to(logits.dtype)
        w = ok.to(logits.dtype)
        per_model = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum(1)
        loss = (per_model / w.sum(1).clamp(min=1)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(active=ok.any(1))


def best_epoch(val_auc: Tensor, val_loss: Tensor) -> Tensor:
    """Early-stopping epoch index per model: max validation AUC, ties -> lower validation loss, then
    the earliest epoch. val_auc, val_loss: (epochs, M) -> (M,) long (NaN AUC counts as -1)."""
    auc = torch.nan_to_num(val_auc, nan=-1.0)
    loss = torch.nan_to_num(val_loss, nan=math.inf)
    best = torch.zeros(auc.shape[1], dtype=torch.long)
    best_auc, best_loss = auc[0].clone(), loss[0].clone()
    for e in range(1, auc.shape[0]):
        better = (auc[e] > best_auc) | ((auc[e] == best_auc) & (loss[e] < best_loss))
        best = torch.where(better, torch.full_like(best, e), best)
        best_auc = torch.where(better, auc[e], best_auc)
        best_loss = torch.where(better, loss[e], best_loss)
    return best


# --------------------------------------------------------------------------------------------------
# Stacked seeds: one model per seed of a fixed configuration (K-MIL)
# --------------------------------------------------------------------------------------------------
def cosine_lrs(lr: float, total_steps: int) -> list[float]:
    """The learning rate before each of ``total_steps`` steps under ``CosineAnnealingLR(T_max=total_steps)``
    (read off torch's own recursive schedule, so that it matches ``training.train_bag_classifier`` exactly)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(probe, T_max=max(1, total_steps))
    lrs = []
    for _ in range(total_steps):
        lrs.append(probe.param_groups[0]["lr"])
        probe.step()
        schedule.step()
    return lrs


def _bag_batch(bags: Tensor, mask: Tensor, idx: Tensor, min_len: int = 1) -> tuple[Tensor, Tensor]:
    """Bags idx (M, B) -> instances (M, B, N, ...) and padding (M, B, N), trimmed to the longest bag used but
    to no fewer than ``min_len`` slots (SparseMAP over k-subsets needs k entries along the bag, padded or not)."""
    n = min(max(int((~mask[idx]).sum(-1).max()), min_len), mask.shape[-1])
    return bags[idx][:, :, :n], mask[idx][:, :, :n]


@torch.no_grad()
def evaluate_stacked(model: BatchedBagClassifier, bags: Tensor, mask: Tensor, labels: Tensor,
                     batch_size: int, precision: str = "fp32") -> dict[str, Tensor]:
    """Eval-mode loss (mean BCE) and accuracy (logit > 0) of every model on the same bag set, (M,) each."""
    model.eval()
    m, logits, min_len = model.num_models, [], int(model.map_params.get("k", 1))
    for start in range(0, len(labels), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(labels))).expand(m, -1)
        with training.autocast(precision, bags.device):
            logits.append(training.full_precision(model(*_bag_batch(bags, mask, idx, min_len))))
    logits = torch.cat(logits, 1)
    y = labels.to(logits.dtype).expand_as(logits)
    return {"loss": F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1),
            "acc": ((logits > 0).to(y.dtype) == y).to(y.dtype).mean(1)}


def train_stacked(model: BatchedBagClassifier, train: tuple[Tensor, Tensor, Tensor],
                  evals: dict[str, tuple[Tensor, Tensor, Tensor]], seeds: Sequence[int], epochs: int, lr: float,
                  weight_decay: float, batch_size: int, grad_clip: float | None, precision: str = "fp32",
                  report: Callable[[dict], None] | None = None) -> list[list[dict]]:
    """Train the M = len(seeds) models of ``model`` (one per seed, same configuration) together; model m
    follows ``training.train_bag_classifier(..., seed=seeds[m], train_metrics="running")`` step for step:
    its own shuffle (torch.Generator seeded with its seed), AdamW + per-model gradient clipping
    (``BatchedAdamW``), the same cosine schedule, BCE-with-logits; after each epoch every set of ``evals``
    in eval mode. With dropout > 0 the dropout masks differ from the separate runs (same distribution).
    ``train``/``evals``: (bags (n, N, ...), padding mask (n, N), labels (n,)). ``report`` gets, per epoch,
    ``{"epoch", "epoch_s", "per_seed": [metrics of model m]}``. Returns the per-seed histories."""
    import time

    bags, mask, labels = train
    m, n_bags = model.num_models, len(labels)
    steps = math.ceil(n_bags / batch_size)
    schedule = cosine_lrs(lr, epochs * steps)
    optimizer = BatchedAdamW(list(model.parameters()), torch.full((m,), schedule[0]), weight_decay,
                             grad_clip=grad_clip)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    model.generator = generators[0]
    histories: list[list[dict]] = [[] for _ in range(m)]
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loss_sum, correct = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
        model.train()
        orders = torch.stack([torch.randperm(n_bags, generator=g) for g in generators])
        for step in range(steps):
            idx = orders[:, step * batch_size:(step + 1) * batch_size]
            optimizer.lr.fill_(schedule[(epoch - 1) * steps + step])
            with training.autocast(precision, bags.device):
                logits = training.full_precision(model(*_bag_batch(bags, mask, idx, int(model.map_params.get("k", 1)))))
            y = labels[idx].to(logits.dtype)
            per_model = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
            optimizer.zero_grad()
            per_model.sum().backward()
            optimizer.step()
            loss_sum += per_model.detach() * idx.shape[1]
            correct += ((logits.detach() > 0).to(y.dtype) == y).sum(1)
        scores = {name: evaluate_stacked(model, *split, batch_size=batch_size, precision=precision)
                  for name, split in evals.items()}
        epoch_s = time.perf_counter() - start
        for i in range(m):
            metrics = {"epoch": epoch, "train_loss": float(loss_sum[i] / n_bags), "train_acc": float(correct[i] / n_bags),
                       **{f"{name}_{k}": float(v[i]) for name, s in scores.items() for k, v in s.items()},
                       "epoch_s": epoch_s}
            histories[i].append(metrics)
        if report is not None:
            report({"epoch": epoch, "epoch_s": epoch_s, "per_seed": [h[-1] for h in histories]})
    return histories
