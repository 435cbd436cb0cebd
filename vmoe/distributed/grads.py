"""Gradient semantics of sharded experts, made to match DDP's mean over ranks.

DDP all-reduces a dense gradient to ``(1/W) sum_r dL_r/dtheta`` (W data-parallel ranks, L_r the loss of
rank r's local batch). An expert lives on one rank of each expert-parallel group and, through the
all-to-all, receives the gradient of every token routed to it from every rank of the group, so after
backward it holds ``sum_{r in group} dL_r/dtheta_e``. ``sync_expert_grads`` sums that over the replica
groups (ranks holding the same experts) and divides by W, giving exactly DDP's mean. Call it once per
optimizer step, after the last backward of the step (the strategy does it).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from .shard import expert_parameters

__all__ = ["sync_expert_grads", "clip_grad_norm_"]


@torch.no_grad()
def sync_expert_grads(model: nn.Module, params: Iterable[Tensor] | None = None) -> None:
    """Turn the summed expert gradients of a sharded model into DDP's mean over the W data-parallel ranks.

    params: restrict to these parameters (the ones one optimizer steps), so that with several optimizers
    each expert gradient is synced exactly once.

    Expert parameters without a gradient (no token reached their layer on this rank) get zeros first:
    on one device they would get a zero gradient too, and the replica all-reduce needs every rank.
    """
    only = None if params is None else {id(p) for p in params}
    for param, hook in expert_parameters(model):
        if not param.requires_grad or (only is not None and id(param) not in only):
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        groups = hook.groups
        if groups.num_replicas > 1:
            dist.all_reduce(param.grad, group=groups.replica_group)
        param.grad.div_(groups.dp_size)


def _sharded_over(grad: Tensor) -> dist.ProcessGroup | None:
    """The process group over which ``grad`` is split into disjoint pieces (an FSDP2 DTensor shard), else None."""
    if isinstance(grad, DTensor) and all(isinstance(p, Shard) for p in grad.placements):
        return grad.device_mesh.get_group()
    return None


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, model: nn.Module,
                    norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the WHOLE model when its experts (and maybe its dense
    weights) are sharded.

    Squared norms of pieces split over ranks are summed over those ranks: expert gradients over their
    expert-parallel group (each rank holds a different slice), FSDP2 DTensor shards over their mesh.
    Replicated gradients (plain DDP ones, or a replicated DTensor) count once. Every rank thus computes the
    same total norm and the same clip coefficient, and replicated weights stay identical across ranks.
    Returns the total norm.
    """
    if norm_type != 2.0:
        raise ValueError(f"expert-parallel gradient clipping supports norm_type=2.0, got {norm_type}")
    hooks = {id(p): hook for p, hook in expert_parameters(model)}
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    device = grads[0].device
    total_sq = torch.zeros((), device=device)
    # {id(group): [squares, group]}: one all-reduce per group, in first-seen order (the same on every rank).
    per_group: dict[int, list] = {}
    for p, g in zip(params, grads):
        group = _sharded_over(p.grad)
        if group is None and isinstance(p.grad, DTensor):  # replicated/partial placements: the full grad, once
            total_sq = total_sq + p.grad.full_tensor().float().pow(2).sum().to(device)
            continue
        hook = hooks.get(id(p))
        if group is None and hook is not None and hook.world_size > 1:
            group = hook.group
        sq = g.detach().float().pow(2).sum().to(device)
        if group is None:
            total_sq = total_sq + sq
        else:
            entry = per_group.setdefault(id(group), [torch.zeros((), device=device), group])
            entry[0] = entry[0] + sq
    for acc, group in per_group.values():
        dist.all_reduce(acc, group=group)
        total_sq = total_sq + acc
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total
