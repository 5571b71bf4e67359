"""Madam: multiplicative weight updates (Bernstein, Zhao, Meister, Liu, Anandkumar & Yue 2020,
"Learning compositional functions via multiplicative weight updates", NeurIPS).

Implemented from the paper's description (Algorithm "Madam"), not from its reference code:

    v_t   = beta * v_{t-1} + (1 - beta) * g_t^2,        v_hat = v_t / (1 - beta^t)
    g*_t  = clip(g_t / sqrt(v_hat), -g_bound, g_bound)  (gradient normalised per entry)
    w_t   = w_{t-1} * exp(-lr * sign(w_{t-1}) * g*_t)   (multiplicative update: relative step ~ lr)
    w_t   = clip(w_t, -w_max, w_max),  w_max = p_scale * RMS(w_0) per parameter tensor

A weight never changes sign and an exactly-zero weight stays zero. hopdeq trains its Hopfield networks
with lr 0.01 / 0.005, p_scale = 1024 and g_bound = 3 (the defaults below).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer


class Madam(Optimizer):
    """Multiplicative Adam-normalised updates; see the module docstring for the equations."""

    def __init__(self, params: Iterable, lr: float = 0.01, p_scale: float = 1024.0, g_bound: float = 3.0,
                 beta: float = 0.999, eps: float = 1e-16) -> None:
        if lr <= 0 or p_scale <= 0 or g_bound <= 0 or not 0 <= beta < 1:
            raise ValueError("Madam needs lr > 0, p_scale > 0, g_bound > 0 and 0 <= beta < 1")
        super().__init__(params, dict(lr=lr, p_scale=p_scale, g_bound=g_bound, beta=beta, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["max"] = group["p_scale"] * p.pow(2).mean().sqrt().item()
                state["step"] += 1
                beta = group["beta"]
                state["exp_avg_sq"].mul_(beta).addcmul_(p.grad, p.grad, value=1 - beta)
                v_hat = state["exp_avg_sq"] / (1 - beta ** state["step"])
                g_norm = (p.grad / (v_hat.sqrt() + group["eps"])).clamp_(-group["g_bound"], group["g_bound"])
                p.mul_(torch.exp(-group["lr"] * torch.sign(p) * g_norm))
                p.clamp_(-state["max"], state["max"])
        return loss
