"""Soft MoE (Puigcerver et al. 2023): experts process weighted averages of tokens (slots); nothing is
dropped and routing is fully differentiable."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp_base import MoEMlpBase
from .experts import StackedExperts
from .routing import Routing
from .settings import RoutingSettings, settings_from_arguments

__all__ = ["SoftMoEMlp"]


class SoftMoEMlp(MoEMlpBase):
    """Soft MoE block, constructed like :class:`vmoe.moe.MoEMlp` (``build_moe_mlp(router="soft", ...)``).

    Each routing group of S = ``group_size`` tokens (None: all B*T tokens of the forward, as for every
    block; the V-MoE models give Soft MoE blocks one image per group, S = T) is mixed into E*p slots, p =
    ``router_kwargs["slots_per_expert"]`` (default 1): logits = X Phi [S, E*p]; dispatch = softmax over
    the S tokens (each slot is a convex mix of tokens); combine = softmax over the E*p slots (each token
    a convex mix of slot outputs). Expert e processes its p slots. ``normalize`` (default True) l2-normalises
    tokens and Phi columns and multiplies by a learned scalar ``scale``, as the paper does for stability.

    Parameters: phi [D, E*p], scale [] (when normalize), experts.fc{1,2}_{weight,bias} as MoEMlp.
    After each forward: aux_loss = 0; metrics: tokens_per_expert [E] = combine mass per expert (soft
    token count), dropped_fraction = dropped_tokens_fraction = 0, load_cv of that mass;
    last_routing [B, T, 1]: each token's expert with the largest combine mass, slot = its best slot in
    that expert (0..p-1), weight = that mass (a top-1 summary for visualisation).
    Not used by this scheme (ValueError when set): k, capacity_factor, eval_capacity_factor,
    batch_priority, noise_std, importance_weight, load_weight and the expert-structure options.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
        use_conv: bool = False,
        *,
        num_experts: int = 8,
        settings: RoutingSettings | None = None,
        group_size: int | None = None,
        router: str = "soft",
        router_kwargs: dict[str, Any] | None = None,
        **unused: Any,
    ) -> None:
        if norm_layer is not None or use_conv:
            raise ValueError("SoftMoEMlp supports neither norm_layer nor use_conv (timm Mlp options); got "
                             f"norm_layer={norm_layer}, use_conv={use_conv}")
        if router != "soft":
            raise ValueError(f"SoftMoEMlp is the 'soft' scheme, got router={router!r}")
        off = {"expert_granularity": 1, "num_shared_experts": 0, "residual": False, "residual_coefficient": False,
               **RoutingSettings.UNSET}
        set_args = sorted(name for name, value in unused.items() if value is not None and off.get(name) != value)
        if set_args:
            raise ValueError(f"soft MoE does not use {set_args}; its knobs are num_experts, group_size and "
                             "router_kwargs slots_per_expert / normalize")
        given = settings_from_arguments(settings, group_size=group_size)
        kwargs = dict(router_kwargs or {})
        slots_per_expert = kwargs.pop("slots_per_expert", 1)
        normalize = kwargs.pop("normalize", True)
        if kwargs:
            raise ValueError(f"soft MoE router_kwargs does not take {sorted(kwargs)}; valid: "
                             "['normalize', 'slots_per_expert']")
        if not isinstance(slots_per_expert, int) or slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be an int >= 1, got {slots_per_expert!r}")
        super().__init__(in_features, num_experts)
        self.settings = given
        hidden_features = hidden_features or in_features
        self.slots_per_expert, self.normalize = slots_per_expert, bool(normalize)
        self.phi = nn.Parameter(torch.randn(in_features, num_experts * slots_per_expert) / math.sqrt(in_features))
        self.scale = nn.Parameter(torch.ones(())) if self.normalize else None
        self.experts = StackedExperts(num_experts, in_features, hidden_features, out_features, act_layer,
                                      bias, drop)

    def check_settings(self, settings: RoutingSettings) -> None:
        # Nothing is dropped, so only the group size applies.
        set_args = sorted(set(settings.set_fields()) - {"group_size"})
        if set_args:
            raise ValueError(f"soft MoE drops nothing and has no router: it does not use {set_args}; its only "
                             "routing setting is group_size")

    def _logits(self, x: Tensor) -> Tensor:
        """x: [G, S, D] -> [G, S, E*p] in float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, phi = x.float(), self.phi.float()
            if self.normalize:
                x, phi = F.normalize(x, dim=-1), self.scale.float() * F.normalize(phi, dim=0)
            return x @ phi

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, D] -> [B, T, D_out]."""
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"SoftMoEMlp expects x of shape [B, T, D={self.in_features}], got {tuple(x.shape)}")
        b, t, d = x.shape
        size = self._groups_of(b * t)
        groups = x.reshape(-1, size, d)  # [G, S, D]
        g, e, p = groups.shape[0], self.num_experts, self.slots_per_expert
        logits = self._logits(groups)  # [G, S, E*p]
        dispatch = logits.softmax(dim=1).to(x.dtype)  # over tokens
        combine = logits.softmax(dim=2)  # over slots
        slots = torch.einsum("gsn,gsd->gnd", dispatch, groups)  # [G, E*p, D]
        # Rows grouped by expert so StackedExperts runs each expert on one block of G*p slots.
        rows = slots.reshape(g, e, p, d).transpose(0, 1).reshape(e * g * p, d)
        y = self.experts(rows, [g * p] * e)
        y = y.reshape(e, g, p, -1).transpose(0, 1).reshape(g, e * p, -1)  # [G, E*p, D_out]
        out = torch.einsum("gsn,gnd->gsd", combine.to(y.dtype), y)
        self._record(combine.detach().reshape(b, t, e, p))
        return out.reshape(b, t, -1)

    @torch.no_grad()
    def _record(self, combine: Tensor) -> None:
        """combine: [B, T, E, p] slot weights of each token."""
        mass = combine.sum(-1)  # [B, T, E]
        tokens = mass.reshape(-1, self.num_experts).sum(0)
        weight, expert = mass.max(-1)
        slot = torch.gather(combine.argmax(-1), -1, expert.unsqueeze(-1))  # [B, T, 1]
        zero = tokens.new_zeros(())
        self.aux_loss = zero
        self.metrics = {"tokens_per_expert": tokens, "dropped_fraction": zero, "dropped_tokens_fraction": zero,
                        "load_cv": tokens.std(unbiased=False) / tokens.mean().clamp_min(1e-10)}
        self.last_routing = Routing(expert.unsqueeze(-1), slot, weight.unsqueeze(-1))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"group_size={self.group_size}, normalize={self.normalize}")
