"""The interface every MoE block implements (MoEMlp, SoftMoEMlp): what the model helpers, the FLOP
counter, the routing pictures and expert parallelism may rely on, instead of probing attributes."""
from __future__ import annotations

from typing import ClassVar

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from .checks import check_positive_int
from .experts import StackedExperts
from .routing import Routing
from .settings import RoutingSettings

__all__ = ["MoEMlpBase"]


class MoEMlpBase(nn.Module):
    """Base of the MoE blocks: a drop-in for timm's Mlp on x [B, T, D] with E stacked experts.

    Attributes every block has:
      in_features (D), num_experts (E), settings (its resolved :class:`RoutingSettings`),
      experts: :class:`StackedExperts` (leading axis E), router: the router module or None,
      aux_loss (weighted, in the graph), metrics (detached) and last_routing (a Routing [B, T, K]),
      all three from the latest forward; expert_parallel: the expert-parallel hook or None.
    Subclasses say whether experts can be sharded over ranks (``supports_expert_parallel``), how many
    experts a token uses (``experts_per_token``, for FLOP counts), how many slots an expert has
    (``capacity``) and which settings fit them (``check_settings``).

    Settings change on a trained model by assigning new ones, ``block.settings =
    block.settings.replace(...)`` (``vmoe.models.set_routing`` does it for every block of a model); the
    block checks them before anything changes.

    torch.fx: every MoE block (subclasses included) is a timm "notrace" module, a leaf that symbolic tracing
    (timm's feature extraction, torchvision's ``create_feature_extractor``) calls as a whole, because routing
    branches on tensor values. TorchScript: ``torch.jit.script`` refuses with a RuntimeError saying why.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        register_notrace_module(cls)  # timm's own check compares classes exactly, so each subclass registers

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling it
        raise RuntimeError(
            f"{type(self).__name__} (an MoE block) cannot be compiled by torch.jit.script: its routing picks and "
            "sorts tokens by value (capacity, Batch Priority Routing, data-dependent dispatch), written with Python "
            "types TorchScript does not support, and TorchScript is in maintenance mode upstream. Use "
            "torch.compile(model) or torch.export.export(model.eval(), (x,)) instead (both supported), or "
            "torch.fx.symbolic_trace with the MoE blocks as leaves (timm's notrace modules).")

    supports_expert_parallel: ClassVar[bool] = False
    experts: StackedExperts
    router: nn.Module | None

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        check_positive_int("num_experts", num_experts)
        self.in_features, self.num_experts = in_features, num_experts
        self.router = None
        self._settings = RoutingSettings()
        self.aux_loss: Tensor = torch.zeros(())
        self.metrics: dict[str, Tensor] = {}
        self.last_routing: Routing | None = None

    @property
    def settings(self) -> RoutingSettings:
        """The routing settings the block runs with (resolved: no scheme default left unset)."""
        return self._settings

    @settings.setter
    def settings(self, settings: RoutingSettings) -> None:
        if not isinstance(settings, RoutingSettings):
            raise TypeError(f"settings must be a RoutingSettings, got {type(settings).__name__}")
        self.check_settings(settings)
        self._settings = settings
        self.settings_changed()

    def check_settings(self, settings: RoutingSettings) -> None:
        """ValueError, naming the setting, when ``settings`` do not fit this block."""

    def settings_changed(self) -> None:
        """Called after new settings are stored (a block may derive state from them)."""

    @property
    def group_size(self) -> int | None:
        """Tokens per routing group (S); None = all B*T tokens of the forward."""
        return self._settings.group_size

    @property
    def expert_parallel(self):
        """The expert-parallel layout (:class:`vmoe.distributed.ExpertParallel`) when the experts are sharded
        over ranks (a block that supports it derives it from its dispatch strategy), else None."""
        return None

    @property
    def experts_per_token(self) -> int | None:
        """Expert MLPs each token's assignments run through (K), None when that is not a fixed count."""
        return None

    @property
    def has_capacity(self) -> bool:
        """True when experts have a fixed number of slots (so assignments can be dropped)."""
        return self._settings.capacity_factor is not None

    def capacity(self, group_size: int, training: bool | None = None) -> int | None:
        """Slots per expert for a routing group of ``group_size`` tokens in training or eval mode (None:
        the block's current mode); None when the block has no capacity (it drops nothing)."""
        return None

    def _groups_of(self, num_tokens: int) -> int:
        """S for a forward of ``num_tokens`` = B*T tokens; ValueError when the group size does not divide it."""
        size = self._settings.group_size or num_tokens
        if num_tokens and num_tokens % size:
            raise ValueError(f"group_size={size} does not divide the B*T={num_tokens} tokens of this forward; "
                             f"choose a divisor of {num_tokens} or None (all tokens of the forward)")
        return size


register_notrace_module(MoEMlpBase)
