"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..routing import expert_choice_routing
from ..settings import RoutingSettings
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

    experts_choose = True
    # Each expert ranks the tokens itself: no per-token k and no batch priority.
    settings_used = Router.settings_used - {"k", "batch_priority"}

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__(num_experts, dim=dim)

    @classmethod
    def default_settings(cls, num_experts: int) -> dict[str, Any]:
        return {"k": num_experts, "capacity_factor": 2.0}  # EC-CF2

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, E]; capacity: tokens each expert takes."""
        scores = self.logits(x).softmax(-1)
        routing = expert_choice_routing(scores, capacity)
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
