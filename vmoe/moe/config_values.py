"""Typed conversion of MoE settings read from files (a Hub/timm ``config.json``'s ``model_args``), the same as the
CLI applies to YAML: ``"false"`` becomes False, ``"1.5"`` 1.5, by each setting's type hint (jsonargparse).

JSON written by hand or by another tool may hold strings where numbers or booleans belong; Python's truth
value of ``"false"`` is True, so without this a string silently switches a feature on. Values that are not
strings are left to the settings' own checks; a string that does not convert is a ValueError naming it.
"""
from __future__ import annotations

import functools
import typing
from typing import Any, Mapping

from .settings import RoutingSettings

__all__ = ["typed_moe_settings"]


@functools.lru_cache(maxsize=None)
def _hints(owner: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(owner)
    except Exception:  # noqa: BLE001 (an unresolvable hint: leave those values to the owner's own checks)
        return {}


def _convert(name: str, hint: Any, value: Any) -> Any:
    from jsonargparse import ArgumentParser

    if not isinstance(value, str) or hint is str:
        return value
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{name}", type=hint)
    try:
        return parser.parse_object({name: value})[name]
    except Exception as err:  # noqa: BLE001 (jsonargparse's ArgumentError and friends)
        kind = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise ValueError(f"MoE setting {name}={value!r} is not a valid {kind} (read as the CLI reads it; e.g. "
                         "true/false for a bool, a number for a float)") from err


def _block_class(router: Any) -> Any:
    from .build import BLOCKS
    from .layer import MoEMlp

    return BLOCKS.get(router, MoEMlp) if isinstance(router, str) else MoEMlp


def typed_moe_settings(settings: Mapping[str, Any], config_cls: type) -> dict[str, Any]:
    """``settings`` (flat names of ``config_cls``, e.g. MoEConfig: its own fields and the RoutingSettings fields)
    with string values converted by the fields' type hints, and the string values of ``moe_kwargs`` by the MoE
    block's ``__init__`` hints."""
    hints = {**_hints(config_cls), **_hints(RoutingSettings)}
    out = {name: _convert(name, hints[name], value) if name in hints else value for name, value in settings.items()}
    extra = out.get("moe_kwargs")
    if isinstance(extra, Mapping):
        block_hints = _hints(_block_class(out.get("router", "vmoe")).__init__)
        out["moe_kwargs"] = {name: _convert(name, block_hints[name], value) if name in block_hints else value
                             for name, value in extra.items()}
    return out
