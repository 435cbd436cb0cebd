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


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, model: nn.Module,
                    norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the WHOLE model when its experts are sharded.

    The norm of the expert gradients is summed over the expert-parallel group (each rank holds a
    different slice), the dense part is already equal on every rank, so every rank computes the same
    total norm and the same clip coefficient, and the dense weights stay identical across ranks.
    Returns the total norm.
    """
    if norm_type != 2.0:
        raise ValueError(f"expert-parallel gradient clipping supports norm_type=2.0, got {norm_type}")
    hooks = {id(p): hook for p, hook in expert_parameters(model)}
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    device = params[0].grad.device
    total_sq = torch.zeros((), device=device)
    # Expert squares summed per expert-parallel group, then one all-reduce per group.
    per_group: dict[int, list] = {}
    for p in params:
        sq = p.grad.detach().float().pow(2).sum().to(device)
        hook = hooks.get(id(p))
        if hook is None:
            total_sq = total_sq + sq
        else:
            entry = per_group.setdefault(id(hook.group), [torch.zeros((), device=device), hook])
            entry[0] = entry[0] + sq
    for acc, hook in per_group.values():
        if hook.world_size > 1:
            dist.all_reduce(acc, group=hook.group)
        total_sq = total_sq + acc
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
