"""How an MoE block routes: one typed, validated settings object (docs/design.md, "Routing settings").

A :class:`RoutingSettings` is built once where settings enter (``MoEConfig`` from the command line or
``create_vmoe`` keywords, or ``MoEMlp(...)`` directly), checked when it is made, resolved against the
routing scheme's defaults when the block is built, and then read by the block at every forward. Every
field keeps one meaning:

- ``k``: experts per token (K; after fine-grained segmentation into m pieces the block holds K' = m*K).
- ``capacity_factor`` / ``eval_capacity_factor``: slots per expert relative to a uniform load, in training /
  in eval mode. An unset eval factor is the training factor.
- ``batch_priority``: Batch Priority Routing (serve the tokens with the largest top gate first).
- ``group_size``: tokens per routing group; None = all B*T tokens of the forward (the whole local batch).
- ``noise_std``: router noise scale in training (V-MoE: sigma = noise_std / E).
- ``bfloat16_dispatch``: expert inputs and outputs rounded to bfloat16, combine in float32 (the reference's
  ``dispatcher.bfloat16``).

None for ``k``, ``capacity_factor`` or ``noise_std`` means "the scheme's default" until the block resolves it;
a scheme refuses a setting it has no use for when that setting is set.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .checks import check_non_negative, check_positive_float, check_positive_int

__all__ = ["RoutingSettings", "V_MOE_CAPACITY_FACTOR", "resolve_settings", "settings_from_arguments"]

# The V-MoE paper's training capacity factor, the default of every token-choice scheme here.
V_MOE_CAPACITY_FACTOR = 1.05


@dataclass(frozen=True)
class RoutingSettings:
    """Routing settings of an MoE block; see the module docstring for each field's meaning."""

    k: int | None = None
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    batch_priority: bool = False
    group_size: int | None = None
    noise_std: float | None = None
    bfloat16_dispatch: bool = False

    # Values that mean "not set": a scheme refuses any other value of a setting it does not use.
    UNSET: ClassVar[Mapping[str, Any]] = {"k": None, "capacity_factor": None, "eval_capacity_factor": None,
                                          "batch_priority": False, "group_size": None, "noise_std": None,
                                          "bfloat16_dispatch": False}

    def __post_init__(self) -> None:
        check_positive_int("k", self.k, optional=True, what=" (the scheme's default)")
        check_positive_float("capacity_factor", self.capacity_factor, optional=True,
                             what=" (the scheme's default)")
        check_positive_float("eval_capacity_factor", self.eval_capacity_factor, optional=True,
                             what=" (= capacity_factor)")
        check_positive_int("group_size", self.group_size, optional=True, what=" (the whole local batch)")
        if self.noise_std is not None:
            check_non_negative(noise_std=self.noise_std)
        for name in ("batch_priority", "bfloat16_dispatch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> "RoutingSettings":
        """A validated copy with ``changes``; unknown names are refused, naming the valid ones."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown routing setting(s) {unknown}; valid: {list(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def factor(self, training: bool) -> float | None:
        """The capacity factor of training (True) or eval mode (False); None for a block without capacity."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def set_fields(self) -> list[str]:
        """Names of the settings that differ from "not set"."""
        return [name for name, unset in self.UNSET.items() if getattr(self, name) != unset]


def resolve_settings(given: RoutingSettings, scheme: str, defaults: Mapping[str, Any],
                     used: frozenset[str]) -> RoutingSettings:
    """The settings a block of routing scheme ``scheme`` runs with.

    ``used``: the settings the scheme reads; any other that ``given`` sets is a ValueError naming it.
    ``defaults``: the scheme's value for each used setting left None. An unset eval factor becomes the
    training factor.
    """
    unused = sorted(set(given.set_fields()) - used)
    if unused:
        raise ValueError(f"routing scheme {scheme!r} does not use {unused}; it takes {sorted(used)}")
    filled = {name: defaults[name] for name in ("k", "capacity_factor", "noise_std")
              if getattr(given, name) is None and name in defaults}
    settings = given.replace(**filled)
    if settings.eval_capacity_factor is None and settings.capacity_factor is not None:
        settings = settings.replace(eval_capacity_factor=settings.capacity_factor)
    return settings


def settings_from_arguments(settings: RoutingSettings | None, **fields: Any) -> RoutingSettings:
    """``settings``, or a RoutingSettings of the keyword ``fields`` (a block constructor takes either).

    ValueError when both are given (one source per setting).
    """
    if settings is None:
        return RoutingSettings(**fields)
    if not isinstance(settings, RoutingSettings):
        raise TypeError(f"settings must be a RoutingSettings, got {type(settings).__name__}")
    also = sorted(name for name, value in fields.items() if value != RoutingSettings.UNSET[name])
    if also:
        raise ValueError(f"{also} given both in settings= and as keywords; give each setting once")
    return settings
