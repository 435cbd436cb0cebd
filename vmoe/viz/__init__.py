"""See the routing: dropped patches, expert maps, expert load, class x expert shares, capacity sweeps.

Pure array functions live in :mod:`.status`, figure functions in :mod:`.plots` (matplotlib Figures, no
pyplot state, so they work headless), model-running helpers in :mod:`.collect` and :mod:`.sweep`, the
Lightning callback in :mod:`.callback` and the ``vmoe visualize`` / ``vmoe sweep`` commands in :mod:`.cli`.
"""
from .collect import (RoutingStats, capacity_blocks, capacity_settings, collect_routing_stats, has_capacity,
                      loads_and_capacity, moe_blocks, patch_layout, route)
from .plots import (OKABE_ITO, display_images, expert_colors, plot_capacity_sweep, plot_class_expert_share,
                    plot_dropped_patches, plot_expert_load, plot_expert_map)
from .report import dropped_patches_note, routing_figures, save_figure
from .status import (DROPPED, KEPT, PARTIAL, STATUS_LABELS, class_expert_counts, expert_load, patch_status,
                     row_shares, status_counts, to_patch_grid, token_status, top1_expert_map)
from .sweep import (DEFAULT_CAPACITY_FACTORS, capacity_sweep, format_sweep_table, mcnemar_p_value,
                    wilson_interval)

__all__ = [
    "RoutingStats", "collect_routing_stats", "loads_and_capacity", "moe_blocks", "patch_layout", "route",
    "capacity_blocks", "capacity_settings", "has_capacity", "dropped_patches_note",
    "OKABE_ITO", "display_images", "expert_colors", "plot_capacity_sweep", "plot_class_expert_share",
    "plot_dropped_patches", "plot_expert_load", "plot_expert_map", "routing_figures", "save_figure",
    "DROPPED", "KEPT", "PARTIAL", "STATUS_LABELS", "class_expert_counts", "expert_load", "patch_status",
    "row_shares", "status_counts", "to_patch_grid", "token_status", "top1_expert_map",
    "DEFAULT_CAPACITY_FACTORS", "capacity_sweep", "format_sweep_table", "mcnemar_p_value", "wilson_interval",
    "RoutingPictures",
]


def __getattr__(name: str):
    # The callback imports Lightning; load it only when asked for, so plotting stays a light import.
    if name == "RoutingPictures":
        from .callback import RoutingPictures
        return RoutingPictures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
