"""Model-level MoE helpers: where the MoE blocks are, their summed loss, routing settings, routing capture.

Routing settings change in one way: each MoE layer's ``settings`` (a :class:`vmoe.moe.RoutingSettings`)
is read, changed with ``replace`` and written back. :func:`set_routing` does that for every layer,
:func:`routing_settings` does it for the duration of a ``with`` and puts the exact old settings back.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..moe import MoEMlpBase, Routing, iter_moe_mlps

__all__ = ["block_index", "moe_mlps_by_block", "moe_block_indices", "aux_loss", "set_routing",
           "routing_settings", "capture_routing"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def block_index(name: str) -> int | None:
    """i of a module named "blocks.<i>..." (also under a wrapper prefix such as DDP's "module."), else None."""
    match = _BLOCK.search(name + ".")
    return None if match is None else int(match.group(1))


def moe_mlps_by_block(model: nn.Module) -> dict[int, MoEMlpBase]:
    """{block index: MoE layer} for every MoE layer under ``blocks.<i>.`` (wrappers such as DDP's
    "module." prefix are fine). Raises ValueError for an MoE layer outside the blocks."""
    found: dict[int, MoEMlpBase] = {}
    for name, layer in iter_moe_mlps(model):
        index = block_index(name)
        if index is None:
            raise ValueError(f"MoE layer {name!r} is not inside a `blocks.<i>` module")
        found[index] = layer
    return found


def moe_block_indices(model: nn.Module) -> list[int]:
    """Sorted indices of the blocks whose MLP is an MoE layer."""
    return sorted(moe_mlps_by_block(model))


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted auxiliary losses of every MoE layer from its latest forward (in the graph).

    A model without MoE layers gives a 0 scalar."""
    losses = [layer.aux_loss for _, layer in iter_moe_mlps(model)]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def _moe_layers(model: nn.Module, action: str) -> list[MoEMlpBase]:
    layers = [layer for _, layer in iter_moe_mlps(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers to {action}")
    return layers


def set_routing(model: nn.Module, *, layers: Sequence[MoEMlpBase] | None = None, **changes: Any) -> int:
    """Change routing settings on every MoE layer of a (trained) model without touching weights: the one
    way to change them (``block.settings = block.settings.replace(...)`` per layer).

    ``changes``: :class:`vmoe.moe.RoutingSettings` fields (capacity_factor, eval_capacity_factor,
    batch_priority, group_size, noise_std, bfloat16_dispatch, k); a None value leaves that setting as it
    is. Every layer's new settings are checked before any layer changes. ``layers``: only these MoE layers
    of the model (default: all of them). Returns the number of MoE layers changed; raises ValueError when
    the model has none (the call would otherwise do nothing).
    """
    changes = {name: value for name, value in changes.items() if value is not None}
    layers = _moe_layers(model, "set routing on") if layers is None else list(layers)
    new = [layer.settings.replace(**changes) for layer in layers]
    for layer, settings in zip(layers, new):  # validates every layer before anything changes
        layer.check_settings(settings)
    for layer, settings in zip(layers, new):
        layer.settings = settings
    return len(layers)


@contextlib.contextmanager
def routing_settings(model: nn.Module, *, layers: Sequence[MoEMlpBase] | None = None,
                     **changes: Any) -> Iterator[None]:
    """:func:`set_routing` inside the ``with``; every layer's exact settings are put back on exit, also
    after an exception."""
    layers = _moe_layers(model, "set routing on") if layers is None else list(layers)
    saved = [layer.settings for layer in layers]
    try:
        set_routing(model, layers=layers, **changes)
        yield
    finally:
        for layer, settings in zip(layers, saved):
            layer.settings = settings


def _detached(routing: Routing) -> Routing:
    return Routing(*(t.detach() for t in routing))


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[dict[int, Routing]]:
    """Record the routing of every MoE block during the forwards inside the ``with``.

    Yields a dict {block index: Routing} of detached tensors shaped [B, T, K] (expert_index,
    slot_index with -1 = dropped, combine_weights), overwritten by each forward so it holds the latest.
    The hooks are removed on exit, also after an exception.
    """
    layers = moe_mlps_by_block(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers whose routing could be captured")
    captured: dict[int, Routing] = {}

    def hook_for(index: int):
        def hook(module: nn.Module, args, output) -> None:
            if module.last_routing is None:
                raise RuntimeError(f"MoE layer of block {index} set no last_routing in its forward")
            captured[index] = _detached(module.last_routing)
        return hook

    handles = [layer.register_forward_hook(hook_for(index)) for index, layer in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
