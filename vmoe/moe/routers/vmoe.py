"""The V-MoE router (SPEC 4): noisy top-k over a softmax, importance and load losses."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import importance_loss, load_loss
from ..routing import top_k_routing
from .base import Router, RouterOutput, float32_logits, register_router

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
        super().__init__(num_experts, k, capacity_factor, eval_capacity_factor, batch_priority)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std, self.importance_weight, self.load_weight = noise_std, importance_weight, load_weight
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, K]."""
        logits = float32_logits(x, self.weight)  # [G, S, E]
        sigma = self.noise_std / self.num_experts
        noisy = self.training and sigma > 0
        noisy_logits = logits + torch.randn_like(logits) * sigma if noisy else logits
        gates = noisy_logits.softmax(-1)
        routing = top_k_routing(gates, self.k, self.capacity(x.shape[-2]), self.batch_priority)
        if self.renormalize:
            top = torch.gather(gates, -1, routing.expert_index)
            routing = routing._replace(combine_weights=routing.combine_weights / top.sum(-1, keepdim=True))
        aux = self.importance_weight * importance_loss(logits.softmax(-1))
        if noisy:
            # softmax is monotonic: the routing's last choice is the k-th largest noisy logit.
            threshold = torch.gather(noisy_logits, -1, routing.expert_index[..., -1:])
            aux = aux + self.load_weight * load_loss(logits, noisy_logits, sigma, self.k, threshold=threshold)
        return RouterOutput(routing, aux)
