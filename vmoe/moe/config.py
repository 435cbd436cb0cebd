"""The MoE settings of a model, validated once where they are read, and the routing settings of a block.

:class:`MoEConfig` is what ``create_vmoe``, ``convert_to_moe``, the timm registry names, ``upcycle`` and
the Lightning module build a V-MoE from: one object, checked when it is made, passed down unchanged.
:class:`RoutingSettings` is the part of a built block that may change on a trained model (capacity
factors, Batch Priority Routing) without touching its weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from .checks import check_non_negative, check_positive_float, check_positive_int

__all__ = ["MoEConfig", "RoutingSettings"]

# Arguments of the MoE block that the model builder fills in from the dense MLP it replaces.
_MLP_ARGS = ("in_features", "hidden_features", "out_features", "act_layer", "bias", "drop")


@dataclass(frozen=True)
class RoutingSettings:
    """Routing settings of one MoE block.

    capacity_factor: slots per expert relative to a uniform load, in training (None: the block has no
    capacity, e.g. soft MoE). eval_capacity_factor: the factor in eval mode; None follows capacity_factor.
    batch_priority: serve the tokens with the largest top gate first (BPR) instead of in position order.
    """

    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    batch_priority: bool = False

    def __post_init__(self) -> None:
        if self.capacity_factor is not None:  # None: a block without capacity (soft MoE)
            check_positive_float("capacity_factor", self.capacity_factor)
        check_positive_float("eval_capacity_factor", self.eval_capacity_factor, optional=True,
                             what=" (= capacity_factor)")
        if not isinstance(self.batch_priority, bool):
            raise ValueError(f"batch_priority must be True or False, got {self.batch_priority!r}")

    def replace(self, **changes: Any) -> "RoutingSettings":
        """A copy with ``changes`` applied verbatim (None for eval_capacity_factor = follow training)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MoEConfig:
    """Where the MoE blocks go in a ViT and how they route. None = the routing scheme's own default.

    moe_layers: "every-n" (blocks n-1, 2n-1, ...), "last-n" (the last n odd blocks) or a list of block
    indices. num_experts: E for every MoE block, or one E per MoE block (in block order). k: experts per
    token (vmoe default 2). capacity_factor / eval_capacity_factor: slots per expert relative to a uniform
    load in training / in eval mode (vmoe default 1.05; eval None = the training factor).
    batch_priority: Batch Priority Routing. noise_std: router noise scale (vmoe: sigma = noise_std / E,
    default 1). group_size: tokens per routing group (None: the whole local batch). router: the routing
    scheme (``vmoe.moe.available_routers()``). moe_kwargs: further MoE block arguments (router_kwargs,
    importance_weight, expert_granularity, num_shared_experts, residual, ...).

    Every value is checked here: inf/nan factors, non-integral counts and negative noise raise ValueError
    naming the setting and its valid range (the scheme name when its block is built).
    """

    moe_layers: str | Sequence[int] = "every-2"
    num_experts: int | Sequence[int] = 8
    k: int | None = None
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    batch_priority: bool = False
    noise_std: float | None = None
    group_size: int | None = None
    router: str = "vmoe"
    moe_kwargs: Mapping[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, (list, tuple)):
            if not self.num_experts:
                raise ValueError("num_experts must be an integer >= 1 or a non-empty list of them, got []")
            for count in self.num_experts:
                check_positive_int("num_experts", count)
        else:
            check_positive_int("num_experts", self.num_experts)
        check_positive_int("k", self.k, optional=True, what=" (the scheme's default)")
        check_positive_float("capacity_factor", self.capacity_factor, optional=True, what=" (the scheme's default)")
        check_positive_float("eval_capacity_factor", self.eval_capacity_factor, optional=True,
                             what=" (= capacity_factor)")
        if self.noise_std is not None:
            check_non_negative(noise_std=self.noise_std)
        check_positive_int("group_size", self.group_size, optional=True, what=" (the whole local batch)")
        if not isinstance(self.batch_priority, bool):
            raise ValueError(f"batch_priority must be True or False, got {self.batch_priority!r}")
        if not isinstance(self.router, str):  # the name itself is checked where the block is built
            raise ValueError(f"router must be a routing scheme name, got {self.router!r}")
        clash = sorted(set(self.moe_kwargs or {}) & set(self.field_names() + _MLP_ARGS))
        if clash:
            raise ValueError(f"moe_kwargs repeats arguments set elsewhere: {clash}; pass them directly")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The setting names, also the keyword names of create_vmoe / convert_to_moe / ImageClassifier."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split(cls, kwargs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
              ) -> tuple["MoEConfig", dict[str, Any]]:
        """(the config made from the MoE settings in ``kwargs`` over ``defaults``, the other kwargs)."""
        names = set(cls.field_names())
        mine = {**(defaults or {}), **{key: value for key, value in kwargs.items() if key in names}}
        return cls(**mine), {key: value for key, value in kwargs.items() if key not in names}

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """One expert count per MoE block; ValueError when a list does not have ``num_layers`` entries."""
        if isinstance(self.num_experts, (list, tuple)):
            if len(self.num_experts) != num_layers:
                raise ValueError(f"num_experts={list(self.num_experts)!r} must be an int or a list with one count "
                                 f"per MoE block ({num_layers} blocks)")
            return list(self.num_experts)
        return [self.num_experts] * num_layers

    def block_kwargs(self, num_experts: int) -> dict[str, Any]:
        """Keyword arguments of one MoE block (``vmoe.moe.build_moe_mlp``) with ``num_experts`` experts.

        Unset (None) settings stay None: the block leaves them to the scheme's defaults, and a scheme such
        as expert_choice or soft refuses only the settings that are actually set.
        """
        return dict(router=self.router, num_experts=num_experts, k=self.k, capacity_factor=self.capacity_factor,
                    eval_capacity_factor=self.eval_capacity_factor, batch_priority=self.batch_priority,
                    noise_std=self.noise_std, group_size=self.group_size, **dict(self.moe_kwargs or {}))
