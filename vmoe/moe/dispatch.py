"""Send tokens to their experts and combine the results, as strategy objects chosen once (docs/design.md,
"Dispatch").

A :class:`Dispatch` takes the block input x [N, D], a routing [G, S, K] (N = G*S), the experts and the
capacity C, and returns the combined expert output [N, D_out]. The strategies:

- ``"sorted"`` (:class:`SortedDispatch`): sort the kept assignments by expert, run each expert on its
  contiguous block, scatter-add back. Computes only kept assignments, but the block sizes are read on the
  host (one sync per layer) and the shapes depend on the data. Fastest eagerly on CPU.
- ``"static"`` (:class:`vmoe.moe.static_dispatch.StaticCapacityDispatch`): buffers [E, G*C, D] filled by
  index, one batched matmul, combined by index; static shapes, no host sync: for torch.compile,
  torch.export, CUDA graphs and GPUs.
- ``"reference"`` (:class:`ReferenceDispatch`): the plain per-expert loop, for reading and for tests.
- ``"auto"`` (:class:`vmoe.moe.dispatch_choice.AutoDispatch`, beside ``build_dispatch``, which picks a strategy by name): static when compiling/exporting or off the CPU, sorted on CPU eager
  (what ``scripts/bench_moe.py`` measured to be faster on each).
- expert parallelism (:class:`vmoe.distributed.ExpertParallelDispatch`): sorted, with all-to-all.

Every strategy takes a :class:`DispatchPrecision`: the experts compute in the autocast dtype under
autocast (else in x's dtype) while the router stays float32; ``round_to=torch.bfloat16`` additionally
rounds expert inputs and outputs to bf16 and combines in float32 (the JAX V-MoE "bfloat16 dispatch").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .routing import Routing

__all__ = ["SortedAssignments", "sort_assignments", "moe_combine", "combine_reference", "Dispatch",
           "DispatchPrecision", "SortedDispatch", "ReferenceDispatch", "compute_dtype"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when autocast is on for x's device, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@dataclass(frozen=True)
class DispatchPrecision:
    """Which dtypes the values crossing the dispatch take.

    round_to: None, or a dtype (bfloat16) that expert inputs are rounded to before the experts and expert
    outputs after them; the combine weights and the weighted sum then stay in the block input's dtype
    (float32 under autocast, V-MoE's ``dispatcher.bfloat16``).
    """

    round_to: torch.dtype | None = None

    def expert_input(self, x: Tensor) -> Tensor:
        """x in the experts' compute dtype, through ``round_to`` first when set."""
        dtype = compute_dtype(x)
        if self.round_to is not None:
            x = x.to(self.round_to)
        return x.to(dtype)

    def expert_output(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """Expert outputs y in the dtype the combine uses: with ``round_to``, rounded and back in the block
        input's ``dtype`` (float32 under autocast); else as the experts computed them."""
        if self.round_to is not None:
            return y.to(self.round_to).to(dtype)
        return y


class Dispatch:
    """A dispatch/combine strategy. ``__call__(x [N, D], routing [G, S, K], experts, capacity) -> [N, D_out]``.

    ``experts`` is a :class:`vmoe.moe.StackedExperts` (or a module with the same methods); capacity is the
    router's C: every kept slot index is < C.
    """

    name = "base"

    def __init__(self, precision: DispatchPrecision | None = None) -> None:
        self.precision = precision or DispatchPrecision()

    def resolve(self, x: Tensor) -> "Dispatch":
        """The strategy that runs for x (itself, except for :class:`AutoDispatch`)."""
        return self

    def with_precision(self, precision: DispatchPrecision) -> "Dispatch":
        """The same strategy with another precision policy."""
        new = copy.copy(self)
        new.precision = precision
        return new

    def __call__(self, x: Tensor, routing: Routing, experts, capacity: int) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision})"


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
    counts_all = torch.zeros(num_experts + 1, dtype=torch.long, device=key.device)
    counts_all.scatter_add_(0, key, torch.ones_like(key))
    counts = counts_all[:num_experts].tolist()  # the one host sync: block sizes for the expert loop
    order = order[: sum(counts)]
    return SortedAssignments(
        token_index=order // k,
        expert_index=expert[order],
        weight=routing.combine_weights.reshape(-1)[order],
        counts=counts,
    )


ExpertFn = Callable[[Tensor, Sequence[int]], Tensor]


def moe_combine(x: Tensor, routing: Routing, experts: ExpertFn, num_experts: int,
                precision: DispatchPrecision | None = None) -> Tensor:
    """Sorted path. x: [N, D] with N = prod(routing leading dims); returns [N, D_out].

    ``experts(x_sorted [A, D], counts) -> [A, D_out]`` computes each expert on its block.
    """
    precision = precision or DispatchPrecision()
    sa = sort_assignments(routing, num_experts)
    y = experts(precision.expert_input(x.index_select(0, sa.token_index)), sa.counts)
    y = precision.expert_output(y, x.dtype)
    y = y * sa.weight.to(y.dtype).unsqueeze(-1)
    out = y.new_zeros(x.shape[0], y.shape[-1])
    return out.index_add_(0, sa.token_index, y)


def combine_reference(x: Tensor, routing: Routing, expert_fn: Callable[[int, Tensor], Tensor],
                      num_experts: int, precision: DispatchPrecision | None = None) -> Tensor:
    """Plain reference: for each expert, gather its kept tokens, run it, add the weighted result back.

    x: [N, D]; ``expert_fn(e, x_e [n, D]) -> [n, D_out]``.
    """
    precision = precision or DispatchPrecision()
    k = routing.expert_index.shape[-1]
    expert = routing.expert_index.reshape(-1, k)
    kept = routing.slot_index.reshape(-1, k) >= 0
    weight = routing.combine_weights.reshape(-1, k)
    out = None
    for e in range(num_experts):
        tokens, choice = torch.nonzero((expert == e) & kept, as_tuple=True)
        y = precision.expert_output(expert_fn(e, precision.expert_input(x[tokens])), x.dtype)
        y = y * weight[tokens, choice].unsqueeze(-1).to(y.dtype)
        out = torch.zeros(x.shape[0], y.shape[-1], dtype=y.dtype, device=x.device) if out is None else out
        out = out.index_add(0, tokens, y.to(out.dtype))
    return out


class SortedDispatch(Dispatch):
    """Sort by expert, one contiguous block per expert (``StackedExperts.forward``), scatter-add back."""

    name = "sorted"

    def __call__(self, x: Tensor, routing: Routing, experts, capacity: int) -> Tensor:
        return moe_combine(x, routing, experts, experts.num_experts, self.precision)


class ReferenceDispatch(Dispatch):
    """The per-expert loop of :func:`combine_reference` (``StackedExperts.forward_expert``)."""

    name = "reference"

    def __call__(self, x: Tensor, routing: Routing, experts, capacity: int) -> Tensor:
        return combine_reference(x, routing, experts.forward_expert, experts.num_experts, self.precision)
