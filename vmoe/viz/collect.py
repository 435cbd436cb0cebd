"""Run a V-MoE on images and collect what the pictures need: routings, loads, class-expert counts.

Works on any timm VisionTransformer whose ``blocks[i].mlp`` are MoE blocks (:class:`vmoe.moe.MoEMlpBase`).
The routing settings (eval capacity factor, BPR) are changed only inside :func:`capacity_settings` and put
back afterwards, so these helpers can run on a model that is still training. Blocks without capacity (Soft
MoE: nothing is dropped) have no such settings: they are routed as they are, with capacity None.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..models import capture_routing, moe_mlps_by_block, routing_settings
from ..moe import MoEMlpBase
from ..moe.routing import Routing
from .status import class_expert_counts, expert_load

__all__ = ["moe_blocks", "has_capacity", "capacity_blocks", "no_capacity_message", "patch_layout",
           "capacity_settings", "route", "layer_capacity", "loads_and_capacity", "RoutingStats",
           "collect_routing_stats"]


def moe_blocks(model: nn.Module) -> dict[int, MoEMlpBase]:
    """{block index: MoE layer} of a timm ViT; ValueError when there is none to picture."""
    found = moe_mlps_by_block(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no MoE layers (MoEMlpBase modules inside "
                         "blocks.<i>); the routing pictures need a V-MoE")
    return found


def has_capacity(layer: MoEMlpBase) -> bool:
    """Whether the block has slots per expert, so that it can drop tokens (False for Soft MoE)."""
    return layer.has_capacity


def capacity_blocks(model: nn.Module) -> dict[int, MoEMlpBase]:
    """{block index: MoE layer} of the blocks that have a capacity (the ones a capacity factor acts on)."""
    return {b: layer for b, layer in moe_blocks(model).items() if has_capacity(layer)}


def no_capacity_message(model: nn.Module) -> str | None:
    """"MoE blocks [1, 3] (SoftMoEMlp) have no capacity ..." naming the blocks without capacity, or None."""
    layers = moe_blocks(model)
    blocks = sorted(b for b, layer in layers.items() if not has_capacity(layer))
    if not blocks:
        return None
    kinds = ", ".join(sorted({type(layers[b]).__name__ for b in blocks}))
    return (f"MoE block{'s' if len(blocks) > 1 else ''} {blocks} ({kinds}) ha{'ve' if len(blocks) > 1 else 's'} "
            "no capacity: Soft MoE mixes tokens into slots and drops nothing")


@contextlib.contextmanager
def capacity_settings(model: nn.Module, *, eval_capacity_factor: float | None = None,
                      batch_priority: bool | None = None) -> Iterator[None]:
    """:func:`routing_settings` on the blocks that have a capacity; blocks without one (Soft MoE) route as
    they are. None leaves a setting as it is. ValueError when a factor or BPR is asked of a model none of whose
    blocks has a capacity (there is nothing to apply it to)."""
    layers = list(capacity_blocks(model).values())
    if not layers:
        if eval_capacity_factor is not None or batch_priority:
            raise ValueError(f"cannot route at eval_capacity_factor={eval_capacity_factor}, batch_priority="
                             f"{batch_priority}: {no_capacity_message(model)}")
        yield
        return
    with routing_settings(model, eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                          layers=layers):
        yield


def patch_layout(model: nn.Module) -> tuple[tuple[int, int], int]:
    """((gh, gw) patch grid, number of prefix tokens such as CLS) of a timm ViT."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "grid_size", None) is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.grid_size; expected a timm ViT")
    gh, gw = (int(g) for g in embed.grid_size)
    return (gh, gw), int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None
                                 else 0))


@torch.inference_mode()
def route(model: nn.Module, images: Tensor, *, eval_capacity_factor: float | None = None,
          batch_priority: bool | None = None) -> tuple[Tensor, dict[int, Routing]]:
    """Eval-mode forward of images [B, C, H, W] -> (logits [B, classes], {block: Routing [B, T, K]}).

    eval_capacity_factor / batch_priority (None: as set) apply to the blocks with a capacity (see
    :func:`capacity_settings`); a Soft MoE block's routing is its top-1 summary, K = 1, nothing dropped.
    The batch is one forward, so with the default routing groups it is also one routing group: the
    picture shows exactly the drops this batch caused. Training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with capacity_settings(model, eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority):
            with capture_routing(model) as captured:
                logits = model(images.to(device))
                routings = dict(captured)
    finally:
        model.train(was_training)
    return logits, {i: Routing(*(t.detach().cpu() for t in r)) for i, r in sorted(routings.items())}


def layer_capacity(layer: MoEMlpBase, batch_size: int, num_tokens: int) -> int | None:
    """Slots per expert summed over the routing groups of an eval forward of [batch_size, num_tokens];
    None for a block without capacity (Soft MoE: it drops nothing)."""
    n = batch_size * num_tokens
    group = layer.group_size or n
    per_group = layer.capacity(group, training=False)
    return None if per_group is None else per_group * (n // group)


def loads_and_capacity(model: nn.Module, routings: Mapping[int, Routing], *,
                       eval_capacity_factor: float | None = None
                       ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, int | None]]:
    """Per-block (kept [K, E], dropped [K, E]) counts and total capacity (None: the block has none, e.g.
    Soft MoE, whose K = 1 counts each token at its dominant expert) for one routed batch.

    eval_capacity_factor: the factor the routing was made at (None: the model's current one).
    """
    layers = moe_blocks(model)
    loads, capacity = {}, {}
    was_training = model.training
    model.eval()  # capacity follows the eval factor, as in the forward that made the routing
    try:
        with capacity_settings(model, eval_capacity_factor=eval_capacity_factor):
            for block, routing in routings.items():
                b, t, _ = routing.expert_index.shape
                loads[block] = expert_load(routing, layers[block].num_experts)
                capacity[block] = layer_capacity(layers[block], b, t)
    finally:
        model.train(was_training)
    return loads, capacity


class RoutingStats:
    """Routing statistics summed over many batches of one model (e.g. a validation set).

    class_counts: {block: [num_classes, E]} patch choices per class (see ``class_expert_counts``);
    kept / dropped: {block: [K, E]} assignments by choice rank (K of the block's routing: 1 for Soft MoE,
    its dominant expert); capacity: {block: slots per expert, summed over every routing group seen; None for
    a block without capacity}; num_batches, num_images. Feed it with :meth:`add` after each forward.
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.layers = moe_blocks(model)
        self.prefix = patch_layout(model)[1]
        self.num_classes = num_classes
        self.class_counts = {b: np.zeros((num_classes, m.num_experts), dtype=np.int64) for b, m in self.layers.items()}
        # [K, E] each, made at the first routing of the block: K is what the block routes with
        self.kept: dict[int, np.ndarray] = {}
        self.dropped: dict[int, np.ndarray] = {}
        self.capacity: dict[int, int | None] = {b: 0 if has_capacity(m) else None for b, m in self.layers.items()}
        self.num_batches = self.num_images = 0

    def add(self, routings: Mapping[int, Routing], labels: Tensor) -> None:
        """Add one eval forward's routings {block: [B, T, K]} with their labels [B].

        The capacity is read from the layers' current eval settings, so call this before changing them.
        """
        for block, routing in routings.items():
            layer = self.layers[block]
            b, t, _ = routing.expert_index.shape
            self.class_counts[block] += class_expert_counts(routing, labels, self.num_classes, layer.num_experts,
                                                            self.prefix)
            kept, dropped = expert_load(routing, layer.num_experts)
            if block not in self.kept:
                self.kept[block], self.dropped[block] = np.zeros_like(kept), np.zeros_like(dropped)
            self.kept[block] += kept
            self.dropped[block] += dropped
            capacity = layer_capacity(layer, b, t)
            if capacity is not None:
                self.capacity[block] += capacity
        self.num_batches += 1
        self.num_images += int(labels.shape[0])

    def mean_loads(self) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, float | None]]:
        """Per-batch averages: ({block: (kept [K, E], dropped [K, E])}, {block: capacity per batch or None})."""
        if self.num_batches == 0:
            raise ValueError("no batch was added")
        n = self.num_batches
        loads = {b: (self.kept[b] / n, self.dropped[b] / n) for b in self.kept}
        capacity = self.capacity
        return loads, {b: None if capacity[b] is None else capacity[b] / n for b in self.kept}


def collect_routing_stats(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int,
                          max_batches: int | None = None) -> RoutingStats:
    """Route (images, labels) batches in eval mode at the model's own settings and sum the statistics."""
    stats = RoutingStats(model, num_classes)
    was_training = model.training
    model.eval()  # so layer_capacity reads the eval capacity factor the forwards use
    try:
        for step, (images, labels) in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            _, routings = route(model, images)
            stats.add(routings, labels)
    finally:
        model.train(was_training)
    return stats
