"""The full set of routing pictures for one model, as named figures (shared by the CLI and the callback)."""
from __future__ import annotations

import os
from typing import Any, Sequence

from matplotlib.figure import Figure
from torch import Tensor, nn

from ..io import atomic_path
from .collect import (RoutingStats, capacity_blocks, has_capacity, loads_and_capacity, moe_blocks, no_capacity_message,
                      patch_layout, route)
from .plots import (display_images, plot_class_expert_share, plot_dropped_patches, plot_expert_load,
                    plot_expert_map)
from .status import patch_status, top1_expert_map
from .sweep import MODES

__all__ = ["routing_figures", "dropped_patches_note", "save_figure", "figure_name"]


def figure_name(kind: str, value: float | int) -> str:
    """File-system and TensorBoard friendly name, e.g. ("dropped_patches_cf", 0.5) -> dropped_patches_cf0.5."""
    return f"{kind}{value:g}" if isinstance(value, float) else f"{kind}{value}"


def _row_labels(labels: Tensor | None, class_names: Sequence[str] | None, n: int) -> list[str]:
    if labels is None:
        return [f"image {i}" for i in range(n)]
    ids = [int(v) for v in labels[:n]]
    if class_names is None:
        return [f"class {c}" for c in ids]
    return [str(class_names[c]) for c in ids]


def routing_figures(model: nn.Module, images: Tensor, labels: Tensor | None = None, *,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    capacity_factors: Sequence[float] | None = None,
                    stats: RoutingStats | None = None, class_names: Sequence[str] | None = None
                    ) -> dict[str, Figure]:
    """Every routing picture of ``model`` for a batch of images [N, C, H, W] (normalised as in training).

    - ``dropped_patches_cf<f>`` for each eval capacity factor f (None: the model's current one):
      the images in rows, per MoE block vanilla routing and BPR side by side;
    - ``expert_map_block<i>`` per MoE block: each patch coloured by its top-1 expert;
    - ``expert_load``: assignments per expert and the capacity line at the model's own settings, averaged
      over the batches of ``stats`` when given (else for this batch);
    - ``class_expert_block<i>`` per block when ``stats`` (e.g. the validation set's) is given.
    Blocks without capacity (Soft MoE: nothing is dropped) get expert maps, loads and class shares of each
    token's dominant expert, and no dropped-patch panels (:func:`dropped_patches_note` says so in a line);
    ValueError when ``capacity_factors`` is given but no block has a capacity.
    The batch is routed as one group, so it should be the size the pictures are meant to show.
    """
    grid, prefix = patch_layout(model)
    layers = moe_blocks(model)
    shown = display_images(images, mean, std)
    rows = _row_labels(labels, class_names, shown.shape[0])
    figures = _dropped_patch_figures(model, images, shown, rows, capacity_factors)
    _, routings = route(model, images)  # the model's own capacity factor and routing mode
    for block, routing in routings.items():
        figures[figure_name("expert_map_block", block)] = plot_expert_map(
            shown, top1_expert_map(routing, grid, prefix), layers[block].num_experts, block=block,
            row_labels=rows, expert="first-choice expert" if has_capacity(layers[block]) else
            "dominant expert (largest combine weight, Soft MoE)")
    setting = _setting_text(model)
    if stats is not None and stats.num_batches:
        loads, capacity = stats.mean_loads()
        title = (f"Tokens per expert per batch (mean over {stats.num_batches} batches, {stats.num_images} images)\n"
                 f"{setting}")
    else:
        loads, capacity = loads_and_capacity(model, routings)
        title = f"Tokens per expert for these {shown.shape[0]} images as one batch\n{setting}"
    figures["expert_load"] = plot_expert_load(loads, capacity, title=title)
    if stats is not None and stats.num_batches:
        for block, counts in sorted(stats.class_counts.items()):
            figures[figure_name("class_expert_block", block)] = plot_class_expert_share(
                counts, class_names, block=block, num_images=stats.num_images,
                choices="all K choices of every patch" if has_capacity(layers[block]) else
                "each patch's dominant expert, Soft MoE")
    return figures


def dropped_patches_note(model: nn.Module) -> str | None:
    """One line saying which blocks the dropped-patch pictures leave out (None: they show every block)."""
    reason = no_capacity_message(model)
    if reason is None:
        return None
    shown = sorted(capacity_blocks(model))
    if not shown:
        return f"no dropped-patch pictures: {reason}"
    return f"dropped-patch pictures show blocks {shown} only: {reason}"


def _dropped_patch_figures(model: nn.Module, images: Tensor, shown: Any, rows: list[str],
                           capacity_factors: Sequence[float] | None) -> dict[str, Figure]:
    """{dropped_patches_cf<f>: figure} over the blocks with a capacity; {} when there is none and no factor
    was asked for; ValueError when factors were asked for but no block has a capacity."""
    grid, prefix = patch_layout(model)
    capped = capacity_blocks(model)
    if not capped:
        if capacity_factors is not None:
            raise ValueError(f"capacity factors {list(capacity_factors)} were given, but {no_capacity_message(model)}"
                             "; there are no dropped patches to picture (leave the capacity factors out)")
        return {}
    if capacity_factors is None:
        capacity_factors = [next(iter(capped.values())).settings.eval_capacity_factor]
    figures: dict[str, Figure] = {}
    for factor in capacity_factors:
        status = {}
        for mode, priority in MODES.items():
            _, routings = route(model, images, eval_capacity_factor=factor, batch_priority=priority)
            status[mode] = {b: patch_status(r, grid, prefix) for b, r in routings.items() if b in capped}
        figures[figure_name("dropped_patches_cf", float(factor))] = plot_dropped_patches(
            shown, status, capacity_factor=float(factor), row_labels=rows)
    return figures


def _setting_text(model: nn.Module) -> str:
    """The routing setting the expert-load picture was made at, e.g. "eval capacity factor 1.05, BPR"."""
    capped = capacity_blocks(model)
    soft = sorted(set(moe_blocks(model)) - set(capped))
    soft_text = "Soft MoE: no capacity, nothing dropped; each token counted at its dominant expert"
    if not capped:
        return soft_text
    first = next(iter(capped.values()))
    text = (f"eval capacity factor {first.settings.eval_capacity_factor:g}, "
            f"{'BPR' if first.settings.batch_priority else 'vanilla routing'}")
    return text if not soft else f"{text}; blocks {soft}: {soft_text}"


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> str:
    """Write ``fig`` as PNG atomically (a reader never sees a half-written file); returns the path."""
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
