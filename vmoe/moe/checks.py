"""Argument checks shared by the MoE configuration, the routers and the blocks.

Each raises ValueError naming the setting, the bad value and the valid range, so a typo in a YAML file
(``.inf``, ``2.5`` experts) fails where it is read instead of deep inside a forward.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_positive_int", "check_positive_float", "check_non_negative"]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value: object, *, optional: bool = False, what: str = "") -> None:
    """``value`` must be an integer >= 1 (or None when ``optional``); ``what`` adds what None means."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        none = f" or None{what}" if optional else ""
        raise ValueError(f"{name} must be an integer >= 1{none}, got {value!r}")


def check_positive_float(name: str, value: object, *, optional: bool = False, what: str = "") -> None:
    """``value`` must be a finite number > 0 (or None when ``optional``); inf and nan are refused."""
    if value is None and optional:
        return
    if not _is_real(value) or not math.isfinite(value) or not value > 0:
        none = f" or None{what}" if optional else ""
        raise ValueError(f"{name} must be > 0{none}, got {value!r}; valid: a finite number > 0")


def check_non_negative(**values: object) -> None:
    """Every keyword must be a finite number >= 0 (loss weights, noise scales)."""
    for name, value in values.items():
        if not _is_real(value) or not math.isfinite(value) or not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}; valid: a finite number >= 0")
