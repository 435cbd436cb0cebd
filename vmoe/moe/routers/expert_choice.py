"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..routing import expert_choice_routing
from .base import Router, RouterOutput, register_router

__all__ = ["ExpertChoiceRouter"]


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """scores = softmax(x W^T) over experts [G, S, E]; expert e takes the C tokens of the group with the
    highest scores[:, e], C = min(S, ceil(S * c / E)) with c = capacity_factor (the paper's average number
    of experts per token; default 2 as in EC-CF2). Balanced by construction: no auxiliary loss, and no
    per-token k or batch priority. Routing is [G, S, E] (K' = E, see :func:`expert_choice_routing`).

    Metrics: experts_per_token_min / _max / _mean, tokens_processed_fraction (>= 1 expert);
    dropped_fraction is redefined as the share of tokens no expert took (= dropped_tokens_fraction).
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 2.0,
                 eval_capacity_factor: float | None = None, batch_priority: bool = False) -> None:
        if batch_priority:
            raise ValueError("expert_choice has no batch priority: each expert ranks the tokens itself; "
                             "got batch_priority=True")
        super().__init__(num_experts, num_experts, capacity_factor, eval_capacity_factor, False, dim=dim)

    @property
    def batch_priority(self) -> bool:
        return False

    @batch_priority.setter
    def batch_priority(self, value: bool) -> None:
        if value:
            raise ValueError("expert_choice has no batch priority; got batch_priority=True")

    def capacity(self, group_size: int, training: bool | None = None) -> int:
        """C = min(S, ceil(S * c / E)): tokens each expert takes from a group of S."""
        training = self.training if training is None else training
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return max(1, min(group_size, math.ceil(group_size * factor / self.num_experts)))

    def forward(self, x: Tensor) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, E]."""
        scores = self.logits(x).softmax(-1)
        routing = expert_choice_routing(scores, self.capacity(x.shape[-2]))
        with torch.no_grad():
            per_token = routing.kept.sum(-1).float()  # [G, S]
            metrics = {
                "experts_per_token_min": per_token.min(),
                "experts_per_token_max": per_token.max(),
                "experts_per_token_mean": per_token.mean(),
                "tokens_processed_fraction": (per_token > 0).float().mean(),
                # No token asks for an expert here, so the only real drop is a token that no expert took.
                "dropped_fraction": (per_token == 0).float().mean(),
            }
        return RouterOutput(routing, scores.new_zeros(()), metrics)
