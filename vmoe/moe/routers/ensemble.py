"""The E³ router (efficient ensembles of experts, Allingham et al. 2022): each ensemble member routes
among its own experts.

Routing rows are ordered (image, token, member), so row s of a group belongs to member ``s % M``
(the group size must be a multiple of M). Member m routes among experts ``m*E/M ... (m+1)*E/M - 1``
with a softmax over those E/M only; the gates are block-diagonal over [S, E] (zeros for the other
members' experts), and capacity, top-K and Batch Priority Routing then run over the full E as usual.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..settings import RoutingSettings

from ..losses import importance_loss, load_loss
from .base import RouterOutput, register_router
from .vmoe import NoisyTopKRouter

__all__ = ["EnsembleRouter", "member_gates"]


def member_gates(member_logits: Tensor) -> Tensor:
    """Block-diagonal gates from per-member logits.

    member_logits: [G, S/M, M, E/M], row (s', m) = token s' of member m. Returns gates [G, S, E] with
    row s = s' * M + m holding softmax(member_logits[g, s', m]) at experts m*E/M ... (m+1)*E/M - 1.
    """
    g, s_m, m, e_m = member_logits.shape
    soft = member_logits.softmax(-1)
    eye = torch.eye(m, dtype=soft.dtype, device=soft.device)
    blocks = soft.unsqueeze(-2) * eye.view(1, 1, m, m, 1)  # [G, S/M, M, M, E/M]
    return blocks.reshape(g, s_m * m, m * e_m)


@register_router("ensemble")
class EnsembleRouter(NoisyTopKRouter):
    """V-MoE's noisy top-k router, one per ensemble member over its E/M experts (weight [E, D], expert
    ``m*E/M + j`` = member m's j-th expert, as in the reference's [D, M, E/M] router kernel).

    Training noise sigma = noise_std / (E/M); importance (+ load) losses per member and group, averaged.
    """

    def __init__(self, dim: int, num_experts: int, importance_weight: float = 0.005, load_weight: float = 0.005,
                 ensemble_size: int = 2) -> None:
        if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise ValueError(f"ensemble_size must be an int >= 1, got {ensemble_size!r}")
        if num_experts % ensemble_size:
            raise ValueError(f"num_experts={num_experts} must be a multiple of ensemble_size={ensemble_size}")
        super().__init__(dim, num_experts, importance_weight, load_weight)
        self.ensemble_size = ensemble_size

    @classmethod
    def default_settings(cls, num_experts: int) -> dict[str, Any]:
        return {**super().default_settings(num_experts), "k": 1}

    def check_settings(self, settings: RoutingSettings) -> None:
        per_member = self.num_experts // self.ensemble_size
        if isinstance(settings.k, bool) or not isinstance(settings.k, int) or not 1 <= settings.k <= per_member:
            raise ValueError(f"k must be in [1, num_experts / ensemble_size = {per_member}] "
                             f"(each member routes among its own experts), got {settings.k!r}")
        if settings.group_size is not None and settings.group_size % self.ensemble_size:
            raise ValueError(f"group_size={settings.group_size} must be a multiple of ensemble_size="
                             f"{self.ensemble_size} (routing rows are tokens x members)")

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D], rows ordered (token, member) -> routing [G, S, K]."""
        g, s, d = x.shape
        m = self.ensemble_size
        if s % m:
            raise ValueError(f"the routing group size {s} must be a multiple of ensemble_size={m}")
        e_m = self.num_experts // m
        weight = self.weight.view(m, e_m, d)
        rows = x.view(g, s // m, m, d)
        # One batched product over the members (each against its own E/M router rows), in float32 as
        # float32_logits computes the other routers' logits.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = torch.einsum("gnmd,mjd->gnmj", rows.float(), weight.float())  # [G, S/M, M, E/M]
        sigma = settings.noise_std / e_m
        noisy = self.training and sigma > 0
        noisy_logits = logits + torch.randn_like(logits) * sigma if noisy else logits
        gates = member_gates(noisy_logits)  # [G, S, E]
        routing = self.route_top_k(gates, settings, capacity)
        per_member = logits.transpose(1, 2).reshape(g * m, s // m, e_m)  # groups x members
        aux = self.importance_weight * importance_loss(per_member.softmax(-1))
        if noisy:
            noisy_members = noisy_logits.transpose(1, 2).reshape(g * m, s // m, e_m)
            threshold = torch.topk(noisy_members, settings.k, dim=-1).values[..., -1:]
            aux = aux + self.load_weight * load_loss(per_member, noisy_members, sigma, settings.k, threshold=threshold)
        return RouterOutput(routing, aux)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ensemble_size={self.ensemble_size}"
