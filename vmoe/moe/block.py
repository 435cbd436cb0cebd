"""The interface every MoE block implements (MoEMlp, SoftMoEMlp): what the model helpers, the FLOP
counter, the routing pictures and expert parallelism may rely on, instead of probing attributes."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .checks import check_positive_int
from .config import RoutingSettings
from .experts import StackedExperts
from .routing import Routing

__all__ = ["MoEBlock"]


class MoEBlock(nn.Module):
    """Base of the MoE blocks: a drop-in for timm's Mlp on x [B, T, D] with E stacked experts.

    Attributes every block has:
      in_features (D), num_experts (E), group_size (S, None = the whole local batch),
      experts: :class:`StackedExperts` (leading axis E), router: the router module or None,
      aux_loss (weighted, in the graph), metrics (detached) and last_routing (a Routing [B, T, K]),
      all three from the latest forward; expert_parallel: the expert-parallel hook or None.
    Subclasses say whether experts can be sharded over ranks (``supports_expert_parallel``) and how many
    experts a token uses (``experts_per_token``, for FLOP counts), and implement ``routing``.
    """

    is_moe_layer: ClassVar[bool] = True
    supports_expert_parallel: ClassVar[bool] = False
    experts: StackedExperts
    router: nn.Module | None

    def __init__(self, in_features: int, num_experts: int, group_size: int | None) -> None:
        super().__init__()
        check_positive_int("num_experts", num_experts)
        check_positive_int("group_size", group_size, optional=True, what=" (the whole local batch)")
        self.in_features, self.num_experts, self.group_size = in_features, num_experts, group_size
        self.router = None
        self.aux_loss: Tensor = torch.zeros(())
        self.metrics: dict[str, Tensor] = {}
        self.last_routing: Routing | None = None

    @property
    def expert_parallel(self):
        """The expert-parallel layout (:class:`vmoe.distributed.ExpertParallel`) when the experts are sharded
        over ranks (a block that supports it derives it from its dispatch strategy), else None."""
        return None

    @property
    def experts_per_token(self) -> int | None:
        """Expert MLPs each token's assignments run through (K), None when that is not a fixed count."""
        return None

    # --- routing settings: one property, the scalar ones below read and write through it -------------
    @property
    def routing(self) -> RoutingSettings:
        """The block's routing settings as set (eval_capacity_factor None = follows capacity_factor)."""
        raise NotImplementedError

    @routing.setter
    def routing(self, settings: RoutingSettings) -> None:
        raise NotImplementedError

    def capacity(self, group_size: int, training: bool | None = None) -> int | None:
        """Slots per expert for a routing group of ``group_size`` tokens in training or eval mode (None:
        the block's current mode); None when the block has no capacity (it drops nothing)."""
        return None

    @property
    def capacity_factor(self) -> float | None:
        return self.routing.capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        self.routing = self.routing.replace(capacity_factor=value)

    @property
    def eval_capacity_factor(self) -> float | None:
        """The factor in eval mode (the training one when not set)."""
        settings = self.routing
        return settings.capacity_factor if settings.eval_capacity_factor is None else settings.eval_capacity_factor

    @eval_capacity_factor.setter
    def eval_capacity_factor(self, value: float | None) -> None:
        self.routing = self.routing.replace(eval_capacity_factor=value)

    @property
    def batch_priority(self) -> bool:
        return self.routing.batch_priority

    @batch_priority.setter
    def batch_priority(self, value: bool) -> None:
        self.routing = self.routing.replace(batch_priority=bool(value))
