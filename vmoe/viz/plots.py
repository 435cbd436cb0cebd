"""Routing pictures as matplotlib Figures (headless: the Agg canvas, no pyplot state).

Each function draws an array from :mod:`vmoe.viz.status`; none runs a model. Colours are Okabe-Ito
(colourblind-safe) and every colour-coded fact also has a second cue (hatching, a symbol or a number).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from .status import DROPPED, PARTIAL, row_shares, status_counts
from .sweep import wilson_interval

__all__ = ["OKABE_ITO", "expert_colors", "display_images", "plot_dropped_patches", "plot_expert_map",
           "plot_expert_load", "plot_class_expert_share", "plot_capacity_sweep", "MODE_NAMES"]

# Okabe & Ito (2008); grey instead of black so it also reads over a dark image.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"]
DROP_COLOR, PARTIAL_COLOR, PARTIAL_HATCH = "#D55E00", "#F0E442", "//"
MODE_NAMES = {"vanilla": "vanilla", "bpr": "BPR"}


def expert_colors(num_experts: int) -> list:
    """One colour per expert: Okabe-Ito up to 8 experts, evenly spaced viridis beyond."""
    if num_experts <= len(OKABE_ITO):
        return [to_rgba(c) for c in OKABE_ITO[:num_experts]]
    from matplotlib import colormaps
    return [colormaps["viridis"](v) for v in np.linspace(0, 1, num_experts)]


def display_images(images: Tensor | np.ndarray, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> np.ndarray:
    """Images [B, C, H, W] (normalised with mean/std, or already in [0, 1]) -> [B, H, W, C] in [0, 1]."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the datamodule's normalisation) or neither")
    if mean is not None:
        m = torch.as_tensor(mean, dtype=x.dtype).reshape(-1)
        s = torch.as_tensor(std, dtype=x.dtype).reshape(-1)
        if m.numel() not in (1, c) or s.numel() not in (1, c):
            raise ValueError(f"mean/std need 1 or C={c} values, got {m.numel()} and {s.numel()}")
        x = x * s.reshape(1, -1, 1, 1) + m.reshape(1, -1, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _show_image(ax, image: np.ndarray, grid_hw: tuple[int, int], gridlines: bool = True) -> tuple[float, float]:
    """Draw image [H, W, C] in pixel coordinates; return the patch size (ph, pw) in pixels."""
    h, w = image.shape[:2]
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest")
    else:
        ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    gh, gw = grid_hw
    ph, pw = h / gh, w / gw
    if gridlines:
        ax.vlines(np.arange(1, gw) * pw, 0, h, colors="white", linewidths=0.4, alpha=0.35)
        ax.hlines(np.arange(1, gh) * ph, 0, w, colors="white", linewidths=0.4, alpha=0.35)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return ph, pw


def _check_grid(name: str, array: np.ndarray, n: int) -> tuple[int, int]:
    if array.ndim != 3 or array.shape[0] != n:
        raise ValueError(f"{name} must be [N={n}, gh, gw] (one row per image), got shape {array.shape}")
    return array.shape[1], array.shape[2]


def plot_dropped_patches(images: np.ndarray, status: Mapping[str, Mapping[int, np.ndarray]], *,
                         capacity_factor: float | None = None, row_labels: Sequence[str] | None = None) -> Figure:
    """Images in rows; for each MoE block one column per routing mode with the dropped patches marked.

    images: [N, H, W, C] in [0, 1] (see :func:`display_images`);
    status: {mode ("vanilla"/"bpr"): {block index: int8 [N, gh, gw] from ``patch_status``}}.
    Patches that lost every choice are filled vermillion with a cross; patches that lost some of their
    choices but kept at least one get a yellow hatched outline. Each panel's label counts both.
    """
    images = np.asarray(images)
    n = images.shape[0]
    modes = list(status)
    if not modes:
        raise ValueError("status is empty: pass {mode: {block: [N, gh, gw]}} for at least one mode")
    blocks = sorted(status[modes[0]])
    for mode in modes:
        if sorted(status[mode]) != blocks:
            raise ValueError(f"mode {mode!r} has blocks {sorted(status[mode])}, expected {blocks}")
    columns = [(b, m) for b in blocks for m in modes]
    fig = _new_figure(1.25 + 1.55 * len(columns), 0.45 + 1.75 * n)
    axes = np.asarray(fig.subplots(n, 1 + len(columns), squeeze=False))
    for i in range(n):
        grid_hw = _check_grid("status", status[modes[0]][blocks[0]], n)[0:2]
        _show_image(axes[i, 0], images[i], grid_hw, gridlines=False)
        axes[i, 0].set_ylabel(row_labels[i] if row_labels is not None else f"image {i}", fontsize=9)
        for j, (block, mode) in enumerate(columns, start=1):
            grid = status[mode][block]
            grid_hw = _check_grid(f"status[{mode!r}][{block}]", grid, n)
            ax = axes[i, j]
            ph, pw = _show_image(ax, images[i], grid_hw)
            for r, c in zip(*np.nonzero(grid[i] == DROPPED)):
                ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, facecolor=DROP_COLOR, alpha=0.7, lw=0))
                ax.plot([c * pw, (c + 1) * pw], [r * ph, (r + 1) * ph], color="black", lw=0.8)
                ax.plot([c * pw, (c + 1) * pw], [(r + 1) * ph, r * ph], color="black", lw=0.8)
            for r, c in zip(*np.nonzero(grid[i] == PARTIAL)):
                ax.add_patch(Rectangle((c * pw + 0.5, r * ph + 0.5), pw - 1, ph - 1, facecolor="none",
                                       edgecolor=PARTIAL_COLOR, hatch=PARTIAL_HATCH, lw=1.0))
            counts = status_counts(grid[i])
            ax.set_xlabel(f"{counts[DROPPED]} lost all, {counts[PARTIAL]} lost some", fontsize=8)
            if i == 0:
                ax.set_title(f"block {block}\n{MODE_NAMES.get(mode, mode)}", fontsize=9)
    axes[0, 0].set_title("input", fontsize=9)
    handles = [Patch(facecolor=DROP_COLOR, alpha=0.7, label="lost every choice (residual only)"),
               Patch(facecolor="none", edgecolor=PARTIAL_COLOR, hatch=PARTIAL_HATCH, label="lost some choices")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    cf = "" if capacity_factor is None else f" at eval capacity factor {capacity_factor:g}"
    fig.suptitle(f"Dropped patches{cf}: vanilla routing vs Batch Priority Routing (BPR)", fontsize=11)
    return fig


def plot_expert_map(images: np.ndarray, expert_map: np.ndarray, num_experts: int, *, block: int,
                    row_labels: Sequence[str] | None = None, annotate: bool | None = None,
                    expert: str = "first-choice expert") -> Figure:
    """Inputs on top, each patch coloured by its top-1 expert below.

    images: [N, H, W, C] in [0, 1]; expert_map: [N, gh, gw] expert ids from ``top1_expert_map``.
    The expert id is also written in each patch when the grid is small enough to read (annotate=None).
    expert: what the map shows, for the title (e.g. "dominant expert" for Soft MoE).
    """
    images = np.asarray(images)
    n = images.shape[0]
    gh, gw = _check_grid("expert_map", np.asarray(expert_map), n)
    if expert_map.size and (expert_map.min() < 0 or expert_map.max() >= num_experts):
        raise ValueError(f"expert_map has ids outside [0, {num_experts})")
    annotate = gh * gw <= 64 if annotate is None else annotate
    colors = expert_colors(num_experts)
    cmap = ListedColormap(colors)
    fig = _new_figure(0.6 + 1.6 * n, 4.0)
    axes = np.asarray(fig.subplots(2, n, squeeze=False))
    for i in range(n):
        _show_image(axes[0, i], images[i], (gh, gw), gridlines=False)
        axes[0, i].set_title(row_labels[i] if row_labels is not None else f"image {i}", fontsize=9)
        ax = axes[1, i]
        ph, pw = _show_image(ax, images[i], (gh, gw), gridlines=False)
        h, w = images[i].shape[:2]
        ax.imshow(expert_map[i], cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, alpha=0.72,
                  extent=(0, w, h, 0), interpolation="nearest")
        ax.vlines(np.arange(1, gw) * pw, 0, h, colors="white", linewidths=0.5)
        ax.hlines(np.arange(1, gh) * ph, 0, w, colors="white", linewidths=0.5)
        if annotate:
            for r in range(gh):
                for c in range(gw):
                    ax.text((c + 0.5) * pw, (r + 0.5) * ph, str(int(expert_map[i, r, c])), ha="center",
                            va="center", fontsize=7, color="black")
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("top-1 expert", fontsize=9)
    handles = [Patch(facecolor=colors[e], label=f"expert {e}") for e in range(num_experts)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(num_experts, 8), fontsize=8,
               frameon=False)
    fig.suptitle(f"Block {block}: each patch coloured by its {expert}", fontsize=11)
    return fig


def plot_expert_load(loads: Mapping[int, tuple[np.ndarray, np.ndarray]], capacity: Mapping[int, float | None], *,
                     title: str = "") -> Figure:
    """Assignments per expert for each MoE block: kept (by choice rank) stacked under the dropped ones,
    with the capacity (slots per expert, summed over routing groups) as a dashed line.

    loads: {block: (kept [K, E], dropped [K, E]) from ``expert_load``}; capacity: {block: total slots, or
    None for a block without capacity (Soft MoE): its bars count each token at its dominant expert, with
    neither a capacity line nor a dropped bar, since nothing is dropped}.
    """
    blocks = sorted(loads)
    if not blocks:
        raise ValueError("loads is empty: pass {block: (kept [K, E], dropped [K, E])}")
    missing = [b for b in blocks if b not in capacity]
    if missing:
        raise ValueError(f"capacity is missing blocks {missing}")
    fig = _new_figure(0.8 + 3.2 * len(blocks), 3.4)
    axes = np.asarray(fig.subplots(1, len(blocks), squeeze=False, sharey=True))[0]
    labelled: set[str] = set()

    def label(text: str) -> str | None:  # each legend entry once, from whichever panel draws it first
        if text in labelled:
            return None
        labelled.add(text)
        return text

    for ax, block in zip(axes, blocks):
        kept, dropped = (np.asarray(a) for a in loads[block])
        _draw_load(ax, kept, dropped, capacity[block], label)
        ax.set_title(f"block {block}: " + ("no capacity, nothing dropped" if capacity[block] is None else
                                           f"{dropped.sum() / max(kept.sum() + dropped.sum(), 1):.0%} of "
                                           "assignments dropped"), fontsize=9)
        ax.set_xticks(np.arange(kept.shape[1]))
        ax.set_xlabel("expert")
    axes[0].set_ylabel("token assignments")
    fig.legend(loc="outside lower center", ncols=max(len(labelled), 1), fontsize=8, frameon=False)
    fig.suptitle(title or "Tokens per expert", fontsize=10)
    return fig


def _draw_load(ax, kept: np.ndarray, dropped: np.ndarray, capacity: float | None, label) -> None:
    """One block's bars: kept [K, E] by rank, dropped [K, E] summed on top, the capacity line (if any)."""
    k, e = kept.shape
    x = np.arange(e)
    bottom = np.zeros(e)
    rank_colors = ["#0072B2", "#56B4E9", "#009E73", "#CC79A7"]
    for rank in range(k):
        name = "tokens at their dominant expert" if capacity is None else f"kept, choice {rank + 1}"
        ax.bar(x, kept[rank], bottom=bottom, color=rank_colors[rank % len(rank_colors)], label=label(name))
        bottom += kept[rank]
    if capacity is None:
        return
    ax.bar(x, dropped.sum(0), bottom=bottom, color="white", edgecolor=DROP_COLOR, hatch="xx", lw=0.8,
           label=label("dropped (over capacity)"))
    ax.axhline(capacity, color="black", ls="--", lw=1.2, label=label("capacity (slots per expert)"))


def plot_class_expert_share(counts: np.ndarray, class_names: Sequence[str] | None = None, *, block: int,
                            annotate: bool | None = None, num_images: int | None = None,
                            choices: str = "all K choices of every patch") -> Figure:
    """Heatmap of the share of each class's patch choices that go to each expert (rows sum to 100%).

    counts: [num_classes, E] from ``class_expert_counts`` (summed over a dataset); choices: what was
    counted, for the title (e.g. "each patch's dominant expert" for Soft MoE).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [num_classes, E], got shape {counts.shape}")
    nc, e = counts.shape
    names = list(class_names) if class_names is not None else [str(c) for c in range(nc)]
    if len(names) != nc:
        raise ValueError(f"{len(names)} class names for {nc} classes")
    share = row_shares(counts)
    annotate = nc * e <= 256 if annotate is None else annotate
    fig = _new_figure(2.2 + 0.55 * e, 1.3 + 0.38 * nc)
    ax = fig.subplots()
    image = ax.imshow(share * 100, cmap="cividis", vmin=0, vmax=max(100 * share.max(), 1e-6), aspect="auto")
    if annotate:
        for r in range(nc):
            for c in range(e):
                v = share[r, c] * 100
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * 100 * share.max() else "white")
    ax.set_xticks(np.arange(e))
    ax.set_yticks(np.arange(nc), labels=names, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("class")
    fig.colorbar(image, ax=ax, label="% of the class's patch choices")
    over = "" if num_images is None else f"\n({choices}, {num_images} images)"
    fig.suptitle(f"Block {block}: which experts each class's patches choose{over}", fontsize=11)
    return fig


def plot_capacity_sweep(rows: Sequence[Mapping[str, float | str]], *, title: str = "") -> Figure:
    """Accuracy and dropped tokens against the eval capacity factor, vanilla vs BPR.

    rows: dicts with keys capacity_factor, mode ("vanilla"/"bpr"), accuracy, dropped_tokens (share of
    tokens that lost every choice) and num_images, as returned by :func:`vmoe.viz.sweep.capacity_sweep`.
    Each accuracy carries its 95% binomial (Wilson) interval over num_images (rows without num_images get
    none); the accuracy axis is zoomed to the data, so the figure states its range; the dropped-token axis
    starts at 0.
    """
    if not rows:
        raise ValueError("rows is empty: run the sweep first")
    fig = _new_figure(9.0, 3.8)
    acc_ax, drop_ax = fig.subplots(1, 2)
    style = {"vanilla": dict(color="#D55E00", marker="o", ls="--"), "bpr": dict(color="#0072B2", marker="s")}
    sizes = {int(r["num_images"]) for r in rows if r.get("num_images")}
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    span = max(r["capacity_factor"] for r in rows) - min(r["capacity_factor"] for r in rows)
    for index, mode in enumerate(modes):
        sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["capacity_factor"])
        cf = [r["capacity_factor"] for r in sel]
        st = style.get(mode, {})
        label = MODE_NAMES.get(mode, mode)
        acc = [100 * r["accuracy"] for r in sel]
        acc_ax.plot(cf, acc, label=label, **st)
        if all(r.get("num_images") for r in sel):
            bounds = [wilson_interval(round(r["accuracy"] * r["num_images"]), int(r["num_images"])) for r in sel]
            yerr = [[a - 100 * lo for a, (lo, _) in zip(acc, bounds)],
                    [100 * hi - a for a, (_, hi) in zip(acc, bounds)]]
            # the two modes' bars side by side (dodged by 1% of the x range) so that they do not hide each other
            dodge = (index - (len(modes) - 1) / 2) * 0.01 * (span or 1.0)
            acc_ax.errorbar([c + dodge for c in cf], acc, yerr=yerr, fmt="none", ecolor=st.get("color"), capsize=3,
                            lw=1)
        drop_ax.plot(cf, [100 * r["dropped_tokens"] for r in sel], label=label, **st)
    drop_ax.set_ylim(bottom=0)
    low, high = acc_ax.get_ylim()
    n_text = f"n = {', '.join(f'{n:,}' for n in sorted(sizes))} images" if sizes else "no image counts"
    bars = "bars: 95% binomial (Wilson) interval" if sizes else "no intervals"
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title(f"axis {low:.1f}-{high:.1f}% (zoomed, not from 0)\n{bars}, {n_text}", fontsize=8)
    drop_ax.set_ylabel("tokens that lost every choice (%)")
    drop_ax.set_title(f"axis from 0 to {drop_ax.get_ylim()[1]:.0f}%", fontsize=8)
    for ax in (acc_ax, drop_ax):
        ax.set_xlabel("eval capacity factor")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title or "Capacity sweep: Batch Priority Routing vs vanilla routing", fontsize=11)
    return fig
