"""Send tokens to their experts and combine the results (docs/design.md, "Dispatch").

The fast path sorts the kept assignments by expert, runs each expert on one contiguous block and
scatter-adds the weighted outputs back: no [S, E, C] one-hot tensors. ``combine_reference`` is the plain
per-expert loop kept beside it for readability and for the equivalence tests.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .routing import Routing

__all__ = ["SortedAssignments", "sort_assignments", "moe_combine", "combine_reference"]


class SortedAssignments(NamedTuple):
    """The kept assignments of a routing, sorted by expert (stable, so token order within an expert).

    token_index: [A] long, the row of x (flattened groups*tokens) of each assignment.
    expert_index: [A] long, non-decreasing.
    weight: [A] combine weight.
    counts: E python ints, assignments per expert (their sum is A).
    """

    token_index: Tensor
    expert_index: Tensor
    weight: Tensor
    counts: list[int]


def sort_assignments(routing: Routing, num_experts: int) -> SortedAssignments:
    """Flatten and sort the kept assignments of ``routing`` ([..., S, K]) by expert."""
    k = routing.expert_index.shape[-1]
    expert = routing.expert_index.reshape(-1)
    kept = routing.slot_index.reshape(-1) >= 0
    # Dropped assignments get key E so the stable sort puts them after every expert's block.
    key = torch.where(kept, expert, torch.full_like(expert, num_experts))
    order = torch.sort(key, stable=True).indices
    counts_all = torch.bincount(key, minlength=num_experts + 1)
    counts = counts_all[:num_experts].tolist()  # the one host sync: block sizes for the expert loop
    order = order[: sum(counts)]
    return SortedAssignments(
        token_index=order // k,
        expert_index=expert[order],
        weight=routing.combine_weights.reshape(-1)[order],
        counts=counts,
    )


ExpertFn = Callable[[Tensor, Sequence[int]], Tensor]


def moe_combine(x: Tensor, routing: Routing, experts: ExpertFn, num_experts: int) -> Tensor:
    """Fast path. x: [N, D] with N = prod(routing leading dims); returns [N, D_out].

    ``experts(x_sorted [A, D], counts) -> [A, D_out]`` computes each expert on its block.
    """
    sa = sort_assignments(routing, num_experts)
    y = experts(x.index_select(0, sa.token_index), sa.counts)
    y = y * sa.weight.to(y.dtype).unsqueeze(-1)
    out = y.new_zeros(x.shape[0], y.shape[-1])
    return out.index_add_(0, sa.token_index, y)


def combine_reference(x: Tensor, routing: Routing, expert_fn: Callable[[int, Tensor], Tensor],
                      num_experts: int) -> Tensor:
    """Plain reference: for each expert, gather its kept tokens, run it, add the weighted result back.

    x: [N, D]; ``expert_fn(e, x_e [n, D]) -> [n, D_out]``.
    """
    k = routing.expert_index.shape[-1]
    expert = routing.expert_index.reshape(-1, k)
    kept = routing.slot_index.reshape(-1, k) >= 0
    weight = routing.combine_weights.reshape(-1, k)
    out = None
    for e in range(num_experts):
        tokens, choice = torch.nonzero((expert == e) & kept, as_tuple=True)
        y = expert_fn(e, x[tokens]) * weight[tokens, choice].unsqueeze(-1).to(x.dtype)
        out = torch.zeros(x.shape[0], y.shape[-1], dtype=y.dtype, device=x.device) if out is None else out
        out = out.index_add(0, tokens, y.to(out.dtype))
    return out
