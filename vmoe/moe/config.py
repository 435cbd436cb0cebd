"""The MoE settings of a model: where the MoE blocks go, how many experts, which scheme, how they route.

:class:`MoEConfig` is what ``create_vmoe``, ``convert_to_moe``, the timm registry names, ``upcycle`` and
the Lightning module build a V-MoE from: one object, checked when it is made, passed down unchanged. Its
``settings`` is the :class:`vmoe.moe.RoutingSettings` every MoE block is built with.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from .checks import check_positive_int
from .settings import RoutingSettings

__all__ = ["MoEConfig"]

# Arguments of the MoE block that the model builder fills in from the dense MLP it replaces.
_MLP_ARGS = ("in_features", "hidden_features", "out_features", "act_layer", "bias", "drop")


@dataclass(frozen=True)
class MoEConfig:
    """Where the MoE blocks go in a ViT and how they route.

    moe_layers: "every-n" (blocks n-1, 2n-1, ...), "last-n" (the last n odd blocks) or a list of block
    indices. num_experts: E for every MoE block, or one E per MoE block (in block order). router: the
    routing scheme (``vmoe.moe.available_routers()``). settings: the :class:`RoutingSettings` of every block
    (k, capacity factors, BPR, group size, noise, bfloat16 dispatch; unset = the scheme's default).
    moe_kwargs: further MoE block arguments (router_kwargs, importance_weight, expert_granularity,
    num_shared_experts, residual, dispatch, ...).

    Built flat from keywords (the command line's and ``create_vmoe``'s) with :meth:`from_flat` /
    :meth:`split`. Every value is checked here: inf/nan factors, non-integral counts and negative noise
    raise ValueError naming the setting and its valid range (the scheme name when its block is built).
    """

    moe_layers: str | Sequence[int] = "every-2"
    num_experts: int | Sequence[int] = 8
    router: str = "vmoe"
    settings: RoutingSettings = field(default_factory=RoutingSettings)
    moe_kwargs: Mapping[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, (list, tuple)):
            if not self.num_experts:
                raise ValueError("num_experts must be an integer >= 1 or a non-empty list of them, got []")
            for count in self.num_experts:
                check_positive_int("num_experts", count)
        else:
            check_positive_int("num_experts", self.num_experts)
        if not isinstance(self.router, str):  # the name itself is checked where the block is built
            raise ValueError(f"router must be a routing scheme name, got {self.router!r}")
        if not isinstance(self.settings, RoutingSettings):
            raise TypeError(f"settings must be a RoutingSettings, got {type(self.settings).__name__}")
        clash = sorted(set(self.moe_kwargs or {}) & set(self.field_names() + _MLP_ARGS + ("settings",)))
        if clash:
            raise ValueError(f"moe_kwargs repeats arguments set elsewhere: {clash}; pass them directly")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The flat setting names, also the keyword names of create_vmoe / convert_to_moe / ImageClassifier."""
        return tuple(f.name for f in fields(cls) if f.name != "settings") + RoutingSettings.field_names()

    @classmethod
    def from_flat(cls, **settings: Any) -> "MoEConfig":
        """The config of flat keywords (``k=2, capacity_factor=1.05, moe_layers="every-2", ...``)."""
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown MoE settings {unknown}; valid: {list(cls.field_names())}")
        routing_names = set(RoutingSettings.field_names())
        routing = RoutingSettings(**{key: value for key, value in settings.items() if key in routing_names})
        return cls(settings=routing, **{key: value for key, value in settings.items() if key not in routing_names})

    @classmethod
    def split(cls, kwargs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
              ) -> tuple["MoEConfig", dict[str, Any]]:
        """(the config made from the MoE settings in ``kwargs`` over ``defaults``, the other kwargs).

        The timm names build through here, also from a Hub/local-dir ``config.json``: string values are
        converted by the settings' types as the CLI does (``"false"`` -> False), see :mod:`.config_values`."""
        from .config_values import typed_moe_settings

        names = set(cls.field_names())
        given = typed_moe_settings({key: value for key, value in kwargs.items() if key in names}, cls)
        mine = {**(defaults or {}), **given}
        return cls.from_flat(**mine), {key: value for key, value in kwargs.items() if key not in names}

    def flat(self) -> dict[str, Any]:
        """The config as flat keywords (the inverse of :meth:`from_flat`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        return {**out, **dataclasses.asdict(self.settings)}

    def replace(self, **changes: Any) -> "MoEConfig":
        """A copy with flat ``changes`` (placement or routing names) applied."""
        return self.from_flat(**{**self.flat(), **changes})

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """One expert count per MoE block; ValueError when a list does not have ``num_layers`` entries."""
        if isinstance(self.num_experts, (list, tuple)):
            if len(self.num_experts) != num_layers:
                raise ValueError(f"num_experts={list(self.num_experts)!r} must be an int or a list with one count "
                                 f"per MoE block ({num_layers} blocks)")
            return list(self.num_experts)
        return [self.num_experts] * num_layers
