"""Model-level MoE helpers: where the MoE blocks are, their summed loss, routing settings, routing capture."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import Tensor, nn

from ..moe import Routing, iter_moe_layers

__all__ = ["moe_layers_by_block", "moe_block_indices", "aux_loss", "set_routing", "capture_routing"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def moe_layers_by_block(model: nn.Module) -> dict[int, nn.Module]:
    """{block index: MoE layer} for every MoE layer under ``blocks.<i>.`` (wrappers such as DDP's
    "module." prefix are fine). Raises ValueError for an MoE layer outside the blocks."""
    found: dict[int, nn.Module] = {}
    for name, layer in iter_moe_layers(model):
        match = _BLOCK.search(name + ".")
        if match is None:
            raise ValueError(f"MoE layer {name!r} is not inside a `blocks.<i>` module")
        found[int(match.group(1))] = layer
    return found


def moe_block_indices(model: nn.Module) -> list[int]:
    """Sorted indices of the blocks whose MLP is an MoE layer."""
    return sorted(moe_layers_by_block(model))


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted auxiliary losses of every MoE layer from its latest forward (in the graph).

    A model without MoE layers gives a 0 scalar."""
    losses = [layer.aux_loss for _, layer in iter_moe_layers(model)]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def set_routing(model: nn.Module, *, capacity_factor: float | None = None,
                eval_capacity_factor: float | None = None, batch_priority: bool | None = None) -> int:
    """Change routing settings on every MoE layer of a (trained) model without touching weights.

    None leaves a setting as it is. Returns the number of MoE layers changed; raises ValueError when the
    model has none (the call would otherwise do nothing).
    """
    layers = [layer for _, layer in iter_moe_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers to set routing on")
    for layer in layers:
        if capacity_factor is not None:
            layer.capacity_factor = capacity_factor
        if eval_capacity_factor is not None:
            layer.eval_capacity_factor = eval_capacity_factor
        if batch_priority is not None:
            layer.batch_priority = batch_priority
    return len(layers)


def _detached(routing: Routing) -> Routing:
    return Routing(*(t.detach() for t in routing))


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[dict[int, Routing]]:
    """Record the routing of every MoE block during the forwards inside the ``with``.

    Yields a dict {block index: Routing} of detached tensors shaped [B, T, K] (expert_index,
    slot_index with -1 = dropped, combine_weights), overwritten by each forward so it holds the latest.
    The hooks are removed on exit, also after an exception.
    """
    layers = moe_layers_by_block(model)
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
