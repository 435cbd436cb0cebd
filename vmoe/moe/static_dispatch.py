"""Static-capacity dispatch: every kept assignment has an (expert, group, slot) address, so the expert
buffers are [E, G*C, D] whatever the routing decided.

Filled by index (unfilled slots read a zero row), run as one batched matmul per expert layer, combined by
index: no one-hot [S, E, C] tensors, no host sync, no shape that depends on the data. That is what
torch.compile(fullgraph=True), torch.export and CUDA graphs need, and what a GPU runs best. The price is
computing the empty slots too (about capacity_factor - 1 of the work more than the sorted path).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Dispatch, DispatchPrecision
from .routing import Routing

__all__ = ["StaticSlots", "static_slots", "StaticCapacityDispatch", "static_combine"]


class StaticSlots(NamedTuple):
    """Addresses of a routing [G, S, K] in buffers [E, G*C] flattened to R = E*G*C rows.

    dest: [N*K] long, the buffer row of each assignment (kept) or 0 (dropped: its combine weight is 0).
    source: [R] long, the token (row of x [N, D]) that fills each buffer row, N for an empty slot.
    """

    dest: Tensor
    source: Tensor


def static_slots(routing: Routing, num_experts: int, capacity: int) -> StaticSlots:
    """Buffer addresses of ``routing`` ([G, S, K], every kept slot < capacity). Pure function.

    Buffer row of assignment (g, s, k): ``(expert * G + g) * C + slot``, so expert e owns rows
    [e*G*C, (e+1)*G*C): one [G*C, D] block per expert, groups folded in.
    """
    if routing.expert_index.dim() != 3:
        raise ValueError(f"routing must be [G, S, K], got expert_index of shape {tuple(routing.expert_index.shape)}")
    g, s, k = routing.expert_index.shape
    rows = num_experts * g * capacity
    group = torch.arange(g, device=routing.expert_index.device).view(g, 1, 1)
    kept = routing.slot_index >= 0
    dest = (routing.expert_index * g + group) * capacity + routing.slot_index
    # Dropped assignments write to a discard row R (dropped from the buffer) and read row 0 with weight 0.
    write = torch.where(kept, dest, torch.full_like(dest, rows)).reshape(-1)
    token = torch.arange(g * s * k, device=write.device) // k
    # index_put_ (not scatter_): it has a deterministic CUDA implementation for --trainer.deterministic.
    source = torch.full((rows + 1,), g * s, dtype=torch.long, device=write.device).index_put_((write,), token)
    read = torch.where(kept, dest, torch.zeros_like(dest)).reshape(-1)
    return StaticSlots(read, source[:rows])


def static_combine(x: Tensor, routing: Routing, experts, capacity: int,
                   precision: DispatchPrecision | None = None) -> Tensor:
    """x: [N, D] (N = G*S) -> [N, D_out]; ``experts.forward_buffers([E, M, D]) -> [E, M, D_out]``."""
    precision = precision or DispatchPrecision()
    e = experts.num_experts
    n, k = x.shape[0], routing.expert_index.shape[-1]
    slots = static_slots(routing, e, capacity)
    xe = precision.expert_input(x)
    # A zero row N for the empty slots: their expert outputs are never read, but they must be finite
    # (0 * NaN in backward would poison the weight gradients).
    buffers = F.pad(xe, (0, 0, 0, 1)).index_select(0, slots.source).view(e, -1, x.shape[-1])
    y = precision.expert_output(experts.forward_buffers(buffers), x.dtype)  # [E, G*C, D_out]
    y = y.reshape(-1, y.shape[-1]).index_select(0, slots.dest).view(n, k, -1)
    weight = routing.combine_weights.reshape(n, k, 1).to(y.dtype)
    return (y * weight).sum(1)


class StaticCapacityDispatch(Dispatch):
    """[E, G*C, D] buffers, one batched matmul per expert layer, combine by index (see module doc)."""

    name = "static"

    def __call__(self, x: Tensor, routing: Routing, experts, capacity: int) -> Tensor:
        return static_combine(x, routing, experts, capacity, self.precision)
