"""The V-MoE router (docs/design.md, "The V-MoE router"): noisy top-k over a softmax, importance and load losses."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import importance_loss, load_loss
from .base import Router, RouterOutput, register_router

__all__ = ["NoisyTopKRouter"]


@register_router("vmoe")
class NoisyTopKRouter(Router):
    """logits = x W^T (float32, no bias); training adds N(0, sigma^2) noise, sigma = noise_std / E;
    gates = softmax(noisy logits); top-k routing with capacity and optional BPR.

    Loss: importance_weight * importance(softmax(clean logits)) + load_weight * load (when noise is on).
    renormalize=True divides the kept top-k gates by their sum (Mixtral-style); off for V-MoE.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, capacity_factor: float = 1.05,
                 eval_capacity_factor: float | None = None, batch_priority: bool = False,
                 noise_std: float = 1.0, importance_weight: float = 0.005, load_weight: float = 0.005,
                 renormalize: bool = False) -> None:
        super().__init__(num_experts, k, capacity_factor, eval_capacity_factor, batch_priority, dim=dim)
        self.check_non_negative(noise_std=noise_std, importance_weight=importance_weight, load_weight=load_weight)
        self.noise_std, self.importance_weight, self.load_weight = noise_std, importance_weight, load_weight
        self.renormalize = renormalize

    def forward(self, x: Tensor) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, K]."""
        logits = self.logits(x)  # [G, S, E]
        sigma = self.noise_std / self.num_experts
        noisy = self.training and sigma > 0
        noisy_logits = logits + torch.randn_like(logits) * sigma if noisy else logits
        gates = noisy_logits.softmax(-1)
        routing = self.route_top_k(gates)
        if self.renormalize:
            top = torch.gather(gates, -1, routing.expert_index)
            routing = routing._replace(combine_weights=routing.combine_weights / top.sum(-1, keepdim=True))
        aux = self.importance_weight * importance_loss(logits.softmax(-1))
        if noisy:
            # softmax is monotonic: the routing's last choice is the k-th largest noisy logit.
            threshold = torch.gather(noisy_logits, -1, routing.expert_index[..., -1:])
            aux = aux + self.load_weight * load_loss(logits, noisy_logits, sigma, self.k, threshold=threshold)
        return RouterOutput(routing, aux)
