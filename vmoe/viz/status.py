"""Pure functions that turn a captured routing into the per-patch arrays the pictures draw.

Every picture in :mod:`vmoe.viz.plots` draws an array computed here, so the tests can check the
pictures against the routing without looking at pixels. Inputs are :class:`vmoe.moe.Routing` tensors
shaped [B, T, K] (T includes the prefix tokens, e.g. CLS); outputs are numpy arrays on the host.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..moe.routing import Routing

__all__ = [
    "KEPT", "PARTIAL", "DROPPED", "STATUS_LABELS", "token_status", "to_patch_grid", "patch_status",
    "status_counts", "top1_expert_map", "expert_load", "class_expert_counts", "row_shares",
]

# Token status codes (int8 values of the arrays below).
KEPT = 0      # every one of the token's K choices got a slot
PARTIAL = 1   # at least one choice kept, at least one lost (only possible when K > 1)
DROPPED = 2   # every choice lost: the token passes through the residual connection only
STATUS_LABELS = {
    KEPT: "kept every choice",
    PARTIAL: "lost some of its K choices",
    DROPPED: "lost every choice (residual only)",
}


def _check_routing(routing: Routing) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"expected a vmoe.moe.Routing, got {type(routing).__name__}")
    if routing.slot_index.dim() != 3:
        raise ValueError("expected a routing shaped [B, T, K] (one image per row), got slot_index of shape "
                         f"{tuple(routing.slot_index.shape)}")


def token_status(routing: Routing) -> np.ndarray:
    """Status code (KEPT / PARTIAL / DROPPED) of every token. routing: [B, T, K] -> int8 [B, T]."""
    _check_routing(routing)
    kept = routing.kept.sum(-1).cpu()  # [B, T]
    k = routing.slot_index.shape[-1]
    status = torch.full(kept.shape, PARTIAL, dtype=torch.int8)
    status[kept == k] = KEPT
    status[kept == 0] = DROPPED
    return status.numpy()


def to_patch_grid(values: np.ndarray | Tensor, grid_size: Sequence[int], num_prefix_tokens: int) -> np.ndarray:
    """Drop the prefix tokens and lay the patch tokens out on the image's patch grid.

    values: [B, T, ...] with T = num_prefix_tokens + gh * gw (timm's row-major patch order)
    -> [B, gh, gw, ...].
    """
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    gh, gw = (int(g) for g in grid_size)
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    t = values.shape[1]
    if t != num_prefix_tokens + gh * gw:
        raise ValueError(f"routing has T={t} tokens per image, but the model has {num_prefix_tokens} prefix "
                         f"token(s) + a {gh}x{gw} patch grid = {num_prefix_tokens + gh * gw}")
    patches = values[:, num_prefix_tokens:]
    return patches.reshape(values.shape[0], gh, gw, *values.shape[2:])


def patch_status(routing: Routing, grid_size: Sequence[int], num_prefix_tokens: int) -> np.ndarray:
    """The marking drawn on each image: status code of every patch. [B, T, K] -> int8 [B, gh, gw]."""
    return to_patch_grid(token_status(routing), grid_size, num_prefix_tokens)


def status_counts(status: np.ndarray) -> dict[int, int]:
    """How many entries of a status array carry each code: {KEPT: n, PARTIAL: n, DROPPED: n}."""
    return {code: int((status == code).sum()) for code in (KEPT, PARTIAL, DROPPED)}


def top1_expert_map(routing: Routing, grid_size: Sequence[int], num_prefix_tokens: int) -> np.ndarray:
    """The expert of every patch's first (highest-gate) choice, whether or not it got a slot.

    [B, T, K] -> int64 [B, gh, gw].
    """
    _check_routing(routing)
    return to_patch_grid(routing.expert_index[..., 0], grid_size, num_prefix_tokens)


def expert_load(routing: Routing, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Assignments per expert, split by choice rank, over every token of the routing (prefix included,
    because the capacity is shared by all routed tokens).

    routing: [..., S, K] -> (kept [K, E], dropped [K, E]) int64 counts.
    """
    expert = routing.expert_index.reshape(-1, routing.expert_index.shape[-1]).cpu()  # [N, K]
    if expert.numel() and (int(expert.min()) < 0 or int(expert.max()) >= num_experts):
        raise ValueError(f"expert_index has values outside [0, {num_experts}); is num_experts={num_experts} "
                         "the layer's number of experts?")
    kept = routing.kept.reshape(expert.shape).cpu()
    k = expert.shape[-1]
    kept_counts = np.zeros((k, num_experts), dtype=np.int64)
    dropped_counts = np.zeros((k, num_experts), dtype=np.int64)
    for rank in range(k):
        e, m = expert[:, rank], kept[:, rank]
        kept_counts[rank] = torch.bincount(e[m], minlength=num_experts).numpy()
        dropped_counts[rank] = torch.bincount(e[~m], minlength=num_experts).numpy()
    return kept_counts, dropped_counts


def class_expert_counts(routing: Routing, labels: Tensor, num_classes: int, num_experts: int,
                        num_prefix_tokens: int) -> np.ndarray:
    """How often the patches of each class chose each expert (all K choices, before capacity).

    routing: [B, T, K]; labels: [B] class indices -> int64 [num_classes, E]. The prefix tokens are left
    out, so a row is about the image content only. Choices do not depend on capacity or BPR.
    """
    _check_routing(routing)
    labels = torch.as_tensor(labels).cpu().long()
    b = routing.expert_index.shape[0]
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B]=[{b}] class indices, got shape {tuple(labels.shape)}")
    if b and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    expert = routing.expert_index[:, num_prefix_tokens:].cpu()  # [B, P, K]
    pair = labels[:, None, None] * num_experts + expert
    counts = torch.bincount(pair.reshape(-1), minlength=num_classes * num_experts)
    return counts.reshape(num_classes, num_experts).numpy()


def row_shares(counts: np.ndarray) -> np.ndarray:
    """Rows of a count matrix scaled to sum to 1 (rows with no counts stay 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
