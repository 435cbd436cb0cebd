"""Switch Transformer router (Fedus et al. 2021): top-1, f*P balance loss, ST-MoE router z-loss."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..checks import check_non_negative
from ..settings import RoutingSettings
from ..losses import gshard_loss, z_loss
from .base import Router, RouterOutput, register_router

__all__ = ["SwitchRouter"]


@register_router("switch")
class SwitchRouter(Router):
    """Each token goes to its single best expert; the router runs in float32 (the paper's selective
    precision).

    gates = softmax(x W^T) [G, S, E]; combine weight = the top-1 gate (not renormalised to 1).
    Loss: balance_weight * E^2 mean_e(frac_top1 * mean_gate) + z_loss_weight * mean(logsumexp^2).
    jitter_eps > 0 multiplies the router input by U(1-eps, 1+eps) noise in training (the paper's jitter);
    it is off by default.
    """

    def __init__(self, dim: int, num_experts: int, balance_weight: float = 0.01, z_loss_weight: float = 1e-3,
                 jitter_eps: float = 0.0) -> None:
        super().__init__(num_experts, dim=dim)
        check_non_negative(balance_weight=balance_weight, z_loss_weight=z_loss_weight)
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        self.balance_weight, self.z_loss_weight, self.jitter_eps = balance_weight, z_loss_weight, jitter_eps

    @classmethod
    def default_settings(cls, num_experts: int) -> dict[str, Any]:
        return {**super().default_settings(num_experts), "k": 1}

    def check_settings(self, settings: RoutingSettings) -> None:
        if settings.k != 1:
            raise ValueError(f"switch routes every token to exactly one expert (k=1), got k={settings.k}; "
                             "use gshard, mixtral or vmoe for k > 1")

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, 1]."""
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = self.logits(x)
        gates = logits.softmax(-1)
        routing = self.route_top_k(gates, settings, capacity)
        balance, zl = gshard_loss(gates), z_loss(logits)
        aux = self.balance_weight * balance + self.z_loss_weight * zl
        return RouterOutput(routing, aux, {"balance_loss": balance.detach(), "z_loss": zl.detach()})
