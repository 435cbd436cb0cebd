"""Pure routing decisions: which expert and which slot each token's choices get (SPEC 3).

Functions here take gate tensors and return a :class:`Routing`; they hold no parameters, so they are
tested on hand-computed values and reused by every router module.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Routing", "top_k_routing", "assign_slots"]


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


def assign_slots(expert_index: Tensor, num_experts: int, capacity: int, priority: Tensor | None) -> Tensor:
    """Slot of each assignment in its expert's buffer, -1 when the buffer is full.

    expert_index: [G, S, K]; priority: [G, S] scores (higher is served first, ties by position) or None
    for position order. Slots are handed out choice-major: every token's 1st choice before any 2nd choice.
    Returns slot_index [G, S, K] long.
    """
    g, s, k = expert_index.shape
    if priority is None:
        order = None
        ordered = expert_index
    else:
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices  # [G, S]
        ordered = torch.gather(expert_index, 1, order.unsqueeze(-1).expand(g, s, k))
    # Choice-major sequence [G, K*S]; position of each assignment among those asking for the same expert.
    seq = ordered.transpose(1, 2).reshape(g, k * s)
    one_hot = torch.nn.functional.one_hot(seq, num_experts)  # [G, K*S, E]
    position = (one_hot.cumsum(dim=1) * one_hot).sum(-1) - 1  # [G, K*S]
    slot = torch.where(position < capacity, position, torch.full_like(position, -1))
    slot = slot.reshape(g, k, s).transpose(1, 2)  # [G, S, K] in service order
    if order is None:
        return slot.contiguous()
    return torch.empty_like(slot).scatter_(1, order.unsqueeze(-1).expand(g, s, k), slot)


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
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lead = gates.shape[:-2]
    flat = gates.reshape(-1, gates.shape[-2], num_experts)  # [G, S, E]
    values, expert_index = torch.topk(flat, k, dim=-1)  # [G, S, K], descending
    priority = values[..., 0] if batch_priority else None
    slot_index = assign_slots(expert_index, num_experts, capacity, priority)
    combine = values * (slot_index >= 0).to(values.dtype)
    return Routing(expert_index, slot_index, combine).reshape(*lead, flat.shape[1])
