"""Shard the experts of every MoE layer over the expert-parallel ranks, and gather them back.

A sharded layer keeps ``E / P`` experts (its slice of every stacked expert parameter, leading axis E) and
dispatches through an :class:`ExpertParallelDispatch` strategy (``layer.dispatch``; its layout is
``layer.expert_parallel``); the router still scores all E.
Checkpoints always hold the FULL expert set: state dicts are gathered before saving and sliced when
loaded, so a checkpoint written with P ranks loads with any P' (1 included, with no strategy at all).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..moe.build import iter_moe_mlps
from .alltoall import ExpertParallel, ExpertParallelDispatch
from .groups import ExpertParallelGroups

__all__ = ["shard_experts", "unshard_experts", "sharded_layers", "expert_parameters", "expert_parameter_names",
           "gather_expert_state_dict", "shard_expert_state_dict", "gather_optimizer_state",
           "shard_optimizer_state"]


def sharded_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, layer) of every MoE layer whose experts are sharded."""
    for name, layer in iter_moe_mlps(model):
        if layer.expert_parallel is not None:
            yield name, layer


def _stacked_params(layer: nn.Module, num_experts: int) -> dict[str, nn.Parameter]:
    params = dict(layer.experts.named_parameters(recurse=False))
    bad = {n: tuple(p.shape) for n, p in params.items() if p.dim() == 0 or p.shape[0] != num_experts}
    if bad or not params:
        raise ValueError(f"expert parallelism shards parameters stacked on a leading expert axis of size "
                         f"E={num_experts}; {type(layer.experts).__name__} has {bad or 'none'}")
    return params


def shard_experts(model: nn.Module, groups: ExpertParallelGroups, *, src: int | None = 0) -> list[str]:
    """Keep only this rank's experts in every MoE layer of ``model``; returns the sharded layers' names.

    src: global rank whose full expert weights every rank takes before slicing (a broadcast, as DDP does
    for the dense weights), so the sharded model is exactly that rank's model. None: slice the local
    weights (they must already be equal on every rank, e.g. loaded from one checkpoint). Layers already
    sharded with the same layout are left alone, so calling this again is harmless.
    """
    names = []
    for name, layer in iter_moe_mlps(model):
        if not layer.supports_expert_parallel:
            raise ValueError(f"MoE layer {name!r} ({type(layer).__name__}) does not support expert parallelism; "
                             "it supports MoEMlp-style layers (router + sort-based dispatch, stacked experts)")
        hook = layer.expert_parallel
        if hook is not None:
            if hook.groups != groups:
                raise ValueError(f"MoE layer {name!r} is already sharded with another layout ({hook.groups}); "
                                 "call unshard_experts first")
            names.append(name)
            continue
        num_experts = layer.num_experts
        if num_experts % groups.ep_size:
            raise ValueError(f"MoE layer {name!r} has {num_experts} experts, not divisible by the "
                             f"expert-parallel size {groups.ep_size}")
        hook = ExpertParallel(groups, num_experts)
        lo, hi = hook.expert_range.start, hook.expert_range.stop
        for pname, param in _stacked_params(layer, num_experts).items():
            full = param.detach()
            if src is not None and groups.dp_size > 1:
                full = full.clone()
                dist.broadcast(full, src=src)
            setattr(layer.experts, pname, nn.Parameter(full[lo:hi].clone(), requires_grad=param.requires_grad))
        layer.experts.num_experts = hook.num_local_experts
        layer.dispatch = ExpertParallelDispatch(hook, layer.dispatch)
        # Routers with a device-level balance loss (DeepSeekMoE) must see the real placement.
        if layer.router.uses_device_placement:
            if layer.router.num_devices not in (None, hook.world_size):
                warnings.warn(f"MoE layer {name!r}: router num_devices={layer.router.num_devices} replaced by "
                              f"the expert-parallel size {hook.world_size} (the real placement)", stacklevel=2)
            layer.router.num_devices = hook.world_size
        names.append(name)
    return names


def _gather(t: Tensor, hook: ExpertParallel) -> Tensor:
    if hook.world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(hook.world_size)]
    dist.all_gather(parts, t.contiguous(), group=hook.group)
    return torch.cat(parts)


def unshard_experts(model: nn.Module) -> None:
    """Gather every sharded layer's experts back into the full set on every rank (collective)."""
    for _, layer in sharded_layers(model):
        hook = layer.expert_parallel
        for pname, param in _stacked_params(layer, hook.num_local_experts).items():
            full = _gather(param.detach(), hook)
            setattr(layer.experts, pname, nn.Parameter(full, requires_grad=param.requires_grad))
        layer.experts.num_experts = hook.num_experts
        layer.dispatch = layer.dispatch.local or "auto"


def expert_parameters(model: nn.Module) -> Iterator[tuple[nn.Parameter, ExpertParallel]]:
    """(parameter, hook) of every sharded expert parameter, in a fixed order (same on every rank)."""
    for _, layer in sharded_layers(model):
        for param in _stacked_params(layer, layer.expert_parallel.num_local_experts).values():
            yield param, layer.expert_parallel


def expert_parameter_names(model: nn.Module) -> dict[str, ExpertParallel]:
    """{state-dict key relative to ``model``: hook} of every sharded expert parameter."""
    out = {}
    for name, layer in sharded_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        for pname in _stacked_params(layer, layer.expert_parallel.num_local_experts):
            out[prefix + pname] = layer.expert_parallel
    return out


def gather_expert_state_dict(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``model.state_dict()`` output with every expert tensor gathered to the full E (collective:
    every rank of the expert-parallel group must call it)."""
    out = dict(state_dict)
    for key, hook in expert_parameter_names(model).items():
        if key not in out:
            raise KeyError(f"expert parameter {key!r} is missing from the state dict being gathered")
        out[key] = _gather(out[key], hook)
    return out


def shard_expert_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a full state dict (E experts per layer) with this rank's slice of every expert tensor."""
    out = dict(state_dict)
    for key, hook in expert_parameter_names(model).items():
        if key not in out:
            continue  # a strict load reports missing keys itself
        t = out[key]
        if t.shape[0] != hook.num_experts:
            raise ValueError(f"checkpoint tensor {key!r} has {t.shape[0]} experts on its leading axis; the model "
                             f"routes to {hook.num_experts} (checkpoints hold the full expert set)")
        r = hook.expert_range
        out[key] = t[r.start:r.stop]
    return out


def _expert_state_slots(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, tuple[nn.Parameter,
                                                                                              ExpertParallel]]:
    """{index in optimizer.state_dict()['state']: (param, hook)} for the sharded expert parameters."""
    hooks = {id(p): (p, hook) for p, hook in expert_parameters(model)}
    slots, index = {}, 0
    for group in optimizer.param_groups:  # state_dict() numbers the params in this order
        for p in group["params"]:
            if id(p) in hooks:
                slots[index] = hooks[id(p)]
            index += 1
    return slots


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                           state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the per-parameter tensors of expert parameters (moments shaped like
    the parameter) gathered to the full E (collective)."""
    out = {**state, "state": dict(state["state"])}
    for index, (param, hook) in sorted(_expert_state_slots(optimizer, model).items()):
        entry = out["state"].get(index)
        if entry is None:
            # The gather is collective: a rank without this state would desynchronise the others.
            raise RuntimeError(f"optimizer state of expert parameter #{index} is missing on rank "
                               f"{hook.groups.global_rank}; sync_expert_grads gives every expert a gradient")
        out["state"][index] = {k: _gather(v, hook) if torch.is_tensor(v) and v.shape == param.shape else v
                               for k, v in entry.items()}
    return out


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                          state: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict (E experts) sliced to this rank's experts."""
    out = {**state, "state": dict(state["state"])}
    for index, (param, hook) in _expert_state_slots(optimizer, model).items():
        entry = out["state"].get(index)
        if entry is None:
            continue
        r = hook.expert_range
        full_shape = (hook.num_experts, *param.shape[1:])
        out["state"][index] = {k: v[r.start:r.stop] if torch.is_tensor(v) and v.shape == full_shape else v
                               for k, v in entry.items()}
    return out
