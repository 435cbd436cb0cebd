"""Dense mixture of experts (Jacobs et al. 1991): every token uses every expert."""
from __future__ import annotations

from torch import Tensor

from .base import Router, RouterOutput, register_router

__all__ = ["DenseRouter"]


@register_router("dense")
class DenseRouter(Router):
    """gates = softmax(x W^T) over all E experts; every token is sent to every expert (K' = E) and the
    outputs are mixed with the gates. No auxiliary loss.

    Capacity still applies as for any top-k routing with k = E: C = ceil(S * E * c / E) >= S for the
    default c >= 1, so nothing is dropped; c < 1 drops (choice-major, BPR if set).
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 1.05,
                 eval_capacity_factor: float | None = None, batch_priority: bool = False) -> None:
        super().__init__(num_experts, num_experts, capacity_factor, eval_capacity_factor, batch_priority, dim=dim)

    def forward(self, x: Tensor) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, E]."""
        gates = self.logits(x).softmax(-1)
        return RouterOutput(self.route_top_k(gates), gates.new_zeros(()))
