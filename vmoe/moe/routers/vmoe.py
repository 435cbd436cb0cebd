"""The V-MoE router (docs/design.md, "The V-MoE router"): noisy top-k over a softmax, importance and load losses."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..checks import check_non_negative
from ..losses import importance_loss, load_loss
from ..settings import RoutingSettings
from .base import Router, RouterOutput, register_router

__all__ = ["NoisyTopKRouter"]


@register_router("vmoe")
class NoisyTopKRouter(Router):
    """logits = x W^T (float32, no bias); training adds N(0, sigma^2) noise, sigma = noise_std / E;
    gates = softmax(noisy logits); top-k routing with capacity and optional BPR.

    Loss: importance_weight * importance(softmax(clean logits)) + load_weight * load (when noise is on).
    renormalize=True divides the kept top-k gates by their sum (Mixtral-style); off for V-MoE.
    """

    settings_used = Router.settings_used | {"noise_std"}

    def __init__(self, dim: int, num_experts: int, importance_weight: float = 0.005, load_weight: float = 0.005,
                 renormalize: bool = False) -> None:
        super().__init__(num_experts, dim=dim)
        check_non_negative(importance_weight=importance_weight, load_weight=load_weight)
        self.importance_weight, self.load_weight = importance_weight, load_weight
        self.renormalize = renormalize

    @classmethod
    def default_settings(cls, num_experts: int) -> dict[str, Any]:
        return {**super().default_settings(num_experts), "noise_std": 1.0}

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, K]."""
        logits = self.logits(x)  # [G, S, E]
        sigma = settings.noise_std / self.num_experts
        noisy = self.training and sigma > 0
        noisy_logits = logits + torch.randn_like(logits) * sigma if noisy else logits
        gates = noisy_logits.softmax(-1)
        routing = self.route_top_k(gates, settings, capacity)
        if self.renormalize:
            top = torch.gather(gates, -1, routing.expert_index)
            routing = routing._replace(combine_weights=routing.combine_weights / top.sum(-1, keepdim=True))
        aux = self.importance_weight * importance_loss(logits.softmax(-1))
        if noisy:
            # softmax is monotonic: the routing's last choice is the k-th largest noisy logit.
            threshold = torch.gather(noisy_logits, -1, routing.expert_index[..., -1:])
            aux = aux + self.load_weight * load_loss(logits, noisy_logits, sigma, settings.k, threshold=threshold)
        return RouterOutput(routing, aux)
