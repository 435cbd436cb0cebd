"""Expert-parallel dispatch: send each token to the rank that holds its expert, bring the output back.

Routing stays local: every rank routes its own groups exactly as on one device and sorts its kept
assignments by (global) expert, as ``vmoe.moe.dispatch.moe_combine`` does. :class:`ExpertParallelDispatch`,
the layer's dispatch strategy once its experts are sharded, then replaces the local expert call
``experts(x_sorted [A, D], counts [E])`` by (``ExpertParallel.dispatch``):

1. counts [E] -> split sizes per destination rank (experts are placed contiguously: rank r of P holds
   ``[r*E/P, (r+1)*E/P)``, so the sorted rows for rank r are one contiguous block);
2. all-to-all of the counts, then of the rows (uneven splits);
3. the received rows arrive ordered (source rank, local expert); they are permuted to (local expert,
   source rank) so each local expert runs on one contiguous block, then permuted back;
4. all-to-all of the outputs back to the ranks the tokens came from.

Autograd flows through both all-to-alls (the backward of an all-to-all is the all-to-all with the split
sizes swapped), so input, router and expert gradients are those of the single-device layer, except that
an expert's gradient is summed over the tokens of every rank of the group: see ``grads.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..moe.dispatch import Dispatch, DispatchPrecision, moe_combine
from ..moe.dispatch_choice import AutoDispatch
from ..moe.routing import Routing
from .groups import ExpertParallelGroups

__all__ = ["all_to_all", "ExpertParallel", "ExpertParallelDispatch"]


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with autograd; rows [N, ...] split along dim 0."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup | None) -> Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
               group: dist.ProcessGroup | None) -> Tensor:
    """Differentiable all-to-all of rows: x [sum(input_splits), ...] -> [sum(output_splits), ...].

    input_splits[p] rows go to rank p of ``group``; output_splits[p] rows come from rank p.
    """
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def _block_permutation(recv_counts: Tensor) -> Tensor:
    """recv_counts [P, L]: rows from source p for local expert j, laid out source-major in the buffer.

    Returns perm [R] such that ``buffer[perm]`` is laid out expert-major (all rows of local expert 0 from
    source 0, 1, ..., then local expert 1, ...), keeping the row order inside each block.
    """
    sizes = recv_counts.reshape(-1)
    total = int(sizes.sum())
    src_start = (sizes.cumsum(0) - sizes).reshape(recv_counts.shape)  # start of block (p, j) in the buffer
    em_sizes = recv_counts.t().reshape(-1)  # block sizes in expert-major order
    em_start = em_sizes.cumsum(0) - em_sizes
    shift = src_start.t().reshape(-1) - em_start
    return torch.arange(total, device=recv_counts.device) + torch.repeat_interleave(shift, em_sizes,
                                                                                    output_size=total)


@dataclass
class ExpertParallel:
    """The hook an MoE layer carries when its experts are sharded (``layer.expert_parallel``).

    num_experts: E, the experts the router scores; the layer's ``experts`` module holds
    ``num_local_experts = E / world_size`` of them: ``expert_range`` of the group's placement.
    """

    groups: ExpertParallelGroups
    num_experts: int

    def __deepcopy__(self, memo: dict) -> "ExpertParallel":
        # Process groups cannot be copied; a deep-copied layer (EMA, SWA) shares the layout, which is stateless.
        return self

    @property
    def world_size(self) -> int:
        """P: ranks the experts are spread over (the device count of the device-level balance loss)."""
        return self.groups.ep_size

    @property
    def rank(self) -> int:
        return self.groups.ep_rank

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.groups.ep_group

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def expert_range(self) -> range:
        """The global indices of the experts this rank holds."""
        n = self.num_local_experts
        return range(self.rank * n, (self.rank + 1) * n)

    def experts_fn(self, local_experts: nn.Module) -> Callable[[Tensor, Sequence[int]], Tensor]:
        """Wrap the local experts into the ``experts(x_sorted, counts)`` callable of ``moe_combine``."""
        return lambda x, counts: self.dispatch(x, counts, local_experts)

    def dispatch(self, x: Tensor, counts: Sequence[int], local_experts: nn.Module) -> Tensor:
        """x: [A, D] rows sorted by global expert; counts: E ints. Returns [A, D_out] in the same order.

        Every rank of the group must call this the same number of times (once per MoE layer per forward).
        """
        if len(counts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} expert counts, got {len(counts)}")
        p, n_local = self.world_size, self.num_local_experts
        if p == 1:
            return local_experts(x, counts)
        send_counts = torch.tensor(list(counts), dtype=torch.long, device=x.device)  # [E] = [P, L]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_counts = recv_counts.reshape(p, n_local)  # [source rank, local expert]
        send_splits = send_counts.reshape(p, n_local).sum(1).tolist()
        recv_table = recv_counts.tolist()  # the host sync: split sizes and block sizes for the experts
        recv_splits = [sum(row) for row in recv_table]
        x_recv = all_to_all(x, recv_splits, send_splits, self.group)  # [R, D], source-major
        perm = _block_permutation(recv_counts)
        local_counts = [sum(row[j] for row in recv_table) for j in range(n_local)]
        y_local = local_experts(x_recv.index_select(0, perm), local_counts)  # [R, D_out], expert-major
        y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local)
        return all_to_all(y_recv, send_splits, recv_splits, self.group)


class ExpertParallelDispatch(Dispatch):
    """The dispatch strategy of a layer whose experts are sharded: sorted by global expert, rows sent to
    the rank holding their expert by all-to-all, run there, sent back and combined.

    expert_parallel: the layout; local: the strategy the layer had before sharding (restored by
    ``unshard_experts``); its precision policy is kept.
    """

    name = "expert_parallel"

    def __init__(self, expert_parallel: ExpertParallel, local: Dispatch | None = None) -> None:
        super().__init__(None if local is None else local.precision)
        self.expert_parallel, self.local = expert_parallel, local

    def with_precision(self, precision: DispatchPrecision) -> "ExpertParallelDispatch":
        local = (self.local or AutoDispatch()).with_precision(precision)
        return ExpertParallelDispatch(self.expert_parallel, local)

    def __call__(self, x: Tensor, routing: Routing, experts, capacity: int) -> Tensor:
        hook = self.expert_parallel
        return moe_combine(x, routing, hook.experts_fn(experts), hook.num_experts, self.precision)

    def __repr__(self) -> str:
        return f"ExpertParallelDispatch(world_size={self.expert_parallel.world_size}, local={self.local!r})"
