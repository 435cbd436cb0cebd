"""GShard router (Lepikhin et al. 2020): top-2 with random routing of the second expert."""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_non_negative
from ..settings import RoutingSettings
from ..losses import gshard_loss
from .base import Router, RouterOutput, register_router

__all__ = ["GShardRouter"]


@register_router("gshard")
class GShardRouter(Router):
    """Top-2 gating: gates = softmax(x W^T); g1, g2 of the two best experts are normalised by g1 + g2
    (these are the combine weights). In training the second expert is kept only when 2 * g2 >= u,
    u ~ U(0, 1) per token, i.e. with probability proportional to its gate; a skipped second choice takes
    no capacity. In eval mode the second expert is always kept (subject to capacity), so evaluation is
    deterministic.

    Loss: balance_weight * E^2 mean_e(frac_top1 * mean_gate) (the GShard auxiliary loss).
    """

    def __init__(self, dim: int, num_experts: int, balance_weight: float = 0.01) -> None:
        if num_experts < 2:
            raise ValueError(f"gshard needs num_experts >= 2, got {num_experts}")
        super().__init__(num_experts, dim=dim)
        check_non_negative(balance_weight=balance_weight)
        self.balance_weight = balance_weight

    def check_settings(self, settings: RoutingSettings) -> None:
        if settings.k != 2:
            raise ValueError(f"gshard is top-2 routing (k=2), got k={settings.k}; use switch for k=1 or vmoe/mixtral")

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, 2]."""
        logits = self.logits(x)
        gates = logits.softmax(-1)
        values, expert_index = torch.topk(gates, 2, dim=-1)
        weights = values / values.sum(-1, keepdim=True)
        keep = None
        if self.training:
            second = 2.0 * weights[..., 1] >= torch.rand_like(weights[..., 1])
            keep = torch.stack([torch.ones_like(second), second], dim=-1)
        routing = self.route(expert_index, weights, settings, capacity, keep)
        balance = gshard_loss(gates)
        metrics = {"balance_loss": balance.detach()}
        if keep is not None:
            metrics["second_expert_sampled"] = keep[..., 1].float().mean().detach()
        return RouterOutput(routing, self.balance_weight * balance, metrics)
