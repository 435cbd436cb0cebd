"""Shazeer et al. 2017 noisy top-k gating with trainable noise, importance and load losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_non_negative
from ..settings import RoutingSettings
from ..losses import importance_loss, noisy_top_k_load_loss
from .base import Router, RouterOutput, float32_logits, register_router

__all__ = ["ShazeerRouter"]


@register_router("shazeer")
class ShazeerRouter(Router):
    """H(x) = x W_g + eps * softplus(x W_noise), eps ~ N(0, 1), in training (clean logits in eval);
    G(x) = softmax over the top-k of H (the combine weights, they sum to 1).

    Loss: importance_weight * CV^2(sum over tokens of G) + load_weight * CV^2(load), the load using the
    learned per-token sigma (:func:`noisy_top_k_load_loss`, training only). Defaults 0.1 and 0.1 as in the
    paper's experiments. W_noise starts at 0 (sigma = softplus(0) = 0.69), as in the paper; W_g starts
    small random (not 0) so that untrained eval routing is not all ties.
    Parameters: weight [E, D], noise_weight [E, D].
    """

    def __init__(self, dim: int, num_experts: int, importance_weight: float = 0.1, load_weight: float = 0.1) -> None:
        super().__init__(num_experts, dim=dim)
        check_non_negative(importance_weight=importance_weight, load_weight=load_weight)
        self.importance_weight, self.load_weight = importance_weight, load_weight
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, K]."""
        clean = self.logits(x)
        if self.training:
            sigma = F.softplus(float32_logits(x, self.noise_weight))
            noisy = clean + torch.randn_like(clean) * sigma
        else:
            sigma, noisy = None, clean
        top, expert_index = torch.topk(noisy, settings.k, dim=-1)
        weights = top.softmax(-1)
        routing = self.route(expert_index, weights, settings, capacity)
        sparse_gates = torch.zeros_like(clean).scatter(-1, expert_index, weights)  # G(x) [G, S, E]
        importance = importance_loss(sparse_gates)
        aux = self.importance_weight * importance
        metrics = {"importance_loss": importance.detach()}
        if sigma is not None and self.load_weight > 0:
            load = noisy_top_k_load_loss(clean, noisy, sigma, settings.k)
            aux = aux + self.load_weight * load
            metrics.update(load_loss=load.detach(), noise_std_mean=sigma.mean().detach())
        return RouterOutput(routing, aux, metrics)
