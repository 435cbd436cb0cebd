"""Pure routing decisions: which expert and which slot each token's choices get (docs/design.md,
"Slot assignment and Batch Priority Routing").

Functions here take gate tensors and return a :class:`Routing`; they hold no parameters, so they are
tested on hand-computed values and reused by every router module.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Routing", "top_k_routing", "assign_slots", "assign_slots_unique_keys", "priority_order",
           "route_choices", "expert_choice_routing", "group_limited_top_k"]


class Routing(NamedTuple):
    """A routing decision for G groups of S tokens, K choices each.

    expert_index: [..., S, K] long, the expert of each choice (choices in descending gate order).
    slot_index: [..., S, K] long, the slot in that expert's buffer, -1 when the assignment was dropped.
    combine_weights: [..., S, K] float, the weight of each kept choice in the output, 0 where dropped.
    """

    expert_index: Tensor
    slot_index: Tensor
    combine_weights: Tensor

    @property
    def kept(self) -> Tensor:
        """[..., S, K] bool, True where the assignment got a slot."""
        return self.slot_index >= 0

    def reshape(self, *shape: int) -> "Routing":
        """The same routing with its leading (group) dims reshaped; the trailing K dim is kept."""
        return Routing(*(t.reshape(*shape, t.shape[-1]) for t in self))


def assign_slots(expert_index: Tensor, num_experts: int, capacity: int, priority: Tensor | None, *,
                 exportable: bool = False) -> Tensor:
    """Slot of each assignment in its expert's buffer, -1 when the buffer is full.

    expert_index: [G, S, K]; priority: [G, S] scores (higher is served first, ties by position) or None
    for position order. Slots are handed out choice-major: every token's 1st choice before any 2nd choice.
    ``exportable``: the same result without a stable sort, which ONNX lacks (the two sorts run on keys made
    distinct by the position, see :func:`priority_order`); eager keeps the stable sort, 1.1-1.7x faster on CPU.
    Returns slot_index [G, S, K] long.
    """
    g, s, k = expert_index.shape
    if priority is None:
        order = None
        ordered = expert_index
    else:
        order = (priority_order(priority) if exportable
                 else torch.sort(priority, dim=-1, descending=True, stable=True).indices)  # [G, S]
        ordered = torch.gather(expert_index, 1, order.unsqueeze(-1).expand(g, s, k))
    # Choice-major sequence [G, K*S]; position of each assignment among those asking for the same expert:
    # its rank in a stable sort by expert minus the start of that expert's run (no [G, K*S, E] one-hot).
    seq = ordered.transpose(1, 2).reshape(g, k * s)
    arange = torch.arange(k * s, device=seq.device)
    if exportable:  # distinct keys: any sort keeps position order within an expert
        by_expert = torch.sort(seq * (k * s) + arange, dim=-1).indices
        experts = torch.gather(seq, 1, by_expert)
    else:
        experts, by_expert = torch.sort(seq, dim=-1, stable=True)
    counts = torch.zeros(g, num_experts, dtype=torch.long, device=seq.device)
    counts.scatter_add_(1, seq, torch.ones_like(seq))
    starts = counts.cumsum(-1) - counts  # [G, E]
    rank = arange.expand(g, -1) - torch.gather(starts, 1, experts)
    position = torch.empty_like(seq).scatter_(1, by_expert, rank)
    slot = torch.where(position < capacity, position, torch.full_like(position, -1))
    slot = slot.reshape(g, k, s).transpose(1, 2)  # [G, S, K] in service order
    if order is None:
        return slot.contiguous()
    return torch.empty_like(slot).scatter_(1, order.unsqueeze(-1).expand(g, s, k), slot)


def priority_order(priority: Tensor) -> Tensor:
    """Token order of a stable sort by descending priority, without a stable sort. priority: [G, S].

    Any sort of distinct keys is stable, so ties are made distinct: sort once (any order among ties),
    number the runs of equal values (0 = highest), and sort again on ``run * S + position``, which puts
    the tokens of a run in position order. Both sorts are plain ONNX TopK. Returns [G, S] long.
    """
    s = priority.shape[-1]
    values, tokens = torch.sort(priority, dim=-1, descending=True)
    new_run = torch.cat([torch.zeros_like(values[..., :1], dtype=torch.long),
                         (values[..., 1:] != values[..., :-1]).long()], dim=-1)
    run = torch.empty_like(tokens).scatter_(-1, tokens, new_run.cumsum(-1))  # [G, S] run of each token
    return torch.sort(run * s + torch.arange(s, device=priority.device), dim=-1).indices


def assign_slots_unique_keys(expert_index: Tensor, num_experts: int, capacity: int,
                             priority: Tensor | None) -> Tensor:
    """:func:`assign_slots` with ``exportable=True`` (what an ONNX export runs)."""
    return assign_slots(expert_index, num_experts, capacity, priority, exportable=True)


def top_k_routing(gates: Tensor, k: int, capacity: int, batch_priority: bool = False) -> Routing:
    """Token-choice top-k routing with per-expert capacity and optional Batch Priority Routing.

    gates: [..., S, E] routing weights; leading dims are independent groups.
    Each token picks its top-k experts; slots go choice-major, within a choice in position order or, with
    ``batch_priority``, in descending order of the token's largest gate. Combine weights are the raw gates
    of kept choices (not renormalised), 0 where dropped.
    """
    if gates.dim() < 2:
        raise ValueError(f"gates must be [..., S, E], got shape {tuple(gates.shape)}")
    num_experts = gates.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}] (the number of experts), got {k}")
    values, expert_index = torch.topk(gates, k, dim=-1)  # [..., S, K], descending
    priority = values[..., 0] if batch_priority else None
    return route_choices(expert_index, values, num_experts, capacity, priority)


def route_choices(expert_index: Tensor, combine_weights: Tensor, num_experts: int, capacity: int,
                  priority: Tensor | None = None, keep: Tensor | None = None) -> Routing:
    """Slots for choices a router already made (selection and combine weights may come from different
    scores, as in Mixtral, GShard or DeepSeek-V3).

    expert_index, combine_weights: [..., S, K]; priority: [..., S] (higher served first) or None for
    position order; keep: [..., S, K] bool or None. A choice with keep=False never takes a slot: it is
    reported dropped (slot -1, weight 0) and leaves its expert's capacity to the others.
    """
    if expert_index.shape != combine_weights.shape or expert_index.dim() < 2:
        raise ValueError("expert_index and combine_weights must both be [..., S, K]; got "
                         f"{tuple(expert_index.shape)} and {tuple(combine_weights.shape)}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lead, (s, k) = expert_index.shape[:-2], expert_index.shape[-2:]
    index = expert_index.reshape(-1, s, k)
    order = None if priority is None else priority.reshape(-1, s)
    # ONNX has no stable sort: an export takes the formulation without one.
    assign = assign_slots_unique_keys if torch.compiler.is_exporting() else assign_slots
    if keep is None:
        slot = assign(index, num_experts, capacity, order)
    else:
        keep = keep.reshape(-1, s, k)
        # Unkept choices queue for a virtual expert E, so they never use a real expert's slot.
        virtual = torch.where(keep, index, torch.full_like(index, num_experts))
        slot = assign(virtual, num_experts + 1, capacity, order)
        slot = torch.where(keep, slot, torch.full_like(slot, -1))
    combine = combine_weights.reshape(-1, s, k) * (slot >= 0).to(combine_weights.dtype)
    return Routing(index, slot, combine).reshape(*lead, s)


def expert_choice_routing(scores: Tensor, capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): every expert takes its top-``capacity`` tokens.

    scores: [..., S, E]. Returns a Routing [..., S, E] (K' = E): expert_index[..., s, e] = e;
    slot_index = the token's rank among expert e's chosen tokens, -1 if e did not choose it;
    combine_weights = scores where chosen, else 0. A token may get 0..E experts.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores must be [..., S, E], got shape {tuple(scores.shape)}")
    lead, (s, e) = scores.shape[:-2], scores.shape[-2:]
    if not 1 <= capacity <= s:
        raise ValueError(f"capacity must be in [1, S={s}] (tokens per group), got {capacity}")
    flat = scores.reshape(-1, s, e)
    g = flat.shape[0]
    chosen = torch.topk(flat, capacity, dim=1).indices  # [G, C, E] token of each expert's slot
    ranks = torch.arange(capacity, device=scores.device).view(1, capacity, 1).expand(g, capacity, e)
    slot = torch.full((g, s, e), -1, dtype=torch.long, device=scores.device).scatter_(1, chosen, ranks)
    expert_index = torch.arange(e, device=scores.device).expand(g, s, e)
    combine = flat * (slot >= 0).to(flat.dtype)
    return Routing(expert_index, slot, combine).reshape(*lead, s)


def group_limited_top_k(scores: Tensor, k: int, num_groups: int = 1, topk_groups: int | None = None
                        ) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 group-limited top-k: experts are split into ``num_groups`` contiguous groups, each
    token keeps its ``topk_groups`` best groups (a group's score = the sum of its 2 highest expert
    scores) and picks its top-k experts inside them.

    scores: [..., S, E]. Returns (values, expert_index), both [..., S, K], descending.
    """
    e = scores.shape[-1]
    topk_groups = num_groups if topk_groups is None else topk_groups
    if num_groups < 1 or e % num_groups:
        raise ValueError(f"num_groups must be >= 1 and divide the number of experts {e}, got {num_groups}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
    per_group = e // num_groups
    if not 1 <= k <= topk_groups * per_group:
        raise ValueError(f"k must be in [1, topk_groups * experts per group = {topk_groups * per_group}], "
                         f"got {k}")
    if topk_groups == num_groups:
        return torch.topk(scores, k, dim=-1)
    grouped = scores.unflatten(-1, (num_groups, per_group))
    group_score = torch.topk(grouped, min(2, per_group), dim=-1).values.sum(-1)  # [..., S, n]
    best = torch.topk(group_score, topk_groups, dim=-1).indices
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, best, True)
    masked = scores.masked_fill(~allowed.repeat_interleave(per_group, dim=-1), float("-inf"))
    return torch.topk(masked, k, dim=-1)
