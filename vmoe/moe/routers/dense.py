"""Dense mixture of experts (Jacobs et al. 1991): every token uses every expert."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..settings import RoutingSettings

from .base import Router, RouterOutput, register_router

__all__ = ["DenseRouter"]


@register_router("dense")
class DenseRouter(Router):
    """gates = softmax(x W^T) over all E experts; every token is sent to every expert (K' = E) and the
    outputs are mixed with the gates. No auxiliary loss.

    Capacity still applies as for any top-k routing with k = E: C = ceil(S * E * c / E) >= S for the
    default c >= 1, so nothing is dropped; c < 1 drops (choice-major, BPR if set).
    """

    settings_used = Router.settings_used - {"k"}  # K = E

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__(num_experts, dim=dim)

    @classmethod
    def default_settings(cls, num_experts: int) -> dict[str, Any]:
        return {**super().default_settings(num_experts), "k": num_experts}

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, E]."""
        gates = self.logits(x).softmax(-1)
        return RouterOutput(self.route_top_k(gates, settings, capacity), gates.new_zeros(()))
