"""Choosing a dispatch strategy: by name (:func:`build_dispatch`) or per call (:class:`AutoDispatch`).

Kept apart from the strategies themselves (``dispatch.py``: sorted, reference; ``static_dispatch.py``:
static capacity) so that both can be imported without either importing the other.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .dispatch import Dispatch, DispatchPrecision, ReferenceDispatch, SortedDispatch
from .routing import Routing
from .static_dispatch import StaticCapacityDispatch

__all__ = ["AutoDispatch", "DISPATCHES", "build_dispatch"]


class AutoDispatch(Dispatch):
    """Static-capacity under torch.compile/export and off the CPU; sorted on CPU eager."""

    name = "auto"

    def __init__(self, precision: DispatchPrecision | None = None) -> None:
        super().__init__(precision)
        self.sorted, self.static = SortedDispatch(self.precision), StaticCapacityDispatch(self.precision)

    def with_precision(self, precision: DispatchPrecision) -> "AutoDispatch":
        return AutoDispatch(precision)

    def resolve(self, x: Tensor) -> Dispatch:
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            return self.static
        return self.sorted

    def __call__(self, x: Tensor, routing: Routing, experts, capacity: int) -> Tensor:
        return self.resolve(x)(x, routing, experts, capacity)


DISPATCHES: dict[str, Callable[[DispatchPrecision | None], Dispatch]] = {
    "auto": AutoDispatch, "sorted": SortedDispatch, "static": StaticCapacityDispatch, "reference": ReferenceDispatch}


def build_dispatch(dispatch: str | Dispatch, precision: DispatchPrecision | None = None) -> Dispatch:
    """A strategy by name (``auto``, ``sorted``, ``static``, ``reference``), or ``dispatch`` itself."""
    if isinstance(dispatch, Dispatch):
        return dispatch
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown dispatch {dispatch!r}; valid: {sorted(DISPATCHES)} or a Dispatch object")
    return DISPATCHES[dispatch](precision)
