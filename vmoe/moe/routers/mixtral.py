"""Mixtral router (Jiang et al. 2024): softmax over the top-K logits."""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_non_negative
from ..settings import RoutingSettings
from ..losses import expert_balance_loss, z_loss
from .base import Router, RouterOutput, register_router

__all__ = ["MixtralRouter"]


@register_router("mixtral")
class MixtralRouter(Router):
    """Each token picks the K experts with the largest logits; combine weights = softmax over those K
    logits (they sum to 1 before capacity drops).

    The paper adds no auxiliary loss, so both weights default to 0. balance_weight > 0 adds the top-K
    f*P loss (:func:`expert_balance_loss` on softmax(logits)); z_loss_weight > 0 adds the router z-loss.
    """

    def __init__(self, dim: int, num_experts: int, balance_weight: float = 0.0, z_loss_weight: float = 0.0) -> None:
        super().__init__(num_experts, dim=dim)
        check_non_negative(balance_weight=balance_weight, z_loss_weight=z_loss_weight)
        self.balance_weight, self.z_loss_weight = balance_weight, z_loss_weight

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, K]."""
        logits = self.logits(x)
        top_logits, expert_index = torch.topk(logits, settings.k, dim=-1)
        weights = top_logits.softmax(-1)
        routing = self.route(expert_index, weights, settings, capacity)
        aux = logits.new_zeros(())
        metrics = {}
        if self.balance_weight > 0:
            balance = expert_balance_loss(logits.softmax(-1), expert_index)
            aux = aux + self.balance_weight * balance
            metrics["balance_loss"] = balance.detach()
        if self.z_loss_weight > 0:
            zl = z_loss(logits)
            aux = aux + self.z_loss_weight * zl
            metrics["z_loss"] = zl.detach()
        return RouterOutput(routing, aux, metrics)
