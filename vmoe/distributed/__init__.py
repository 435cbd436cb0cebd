"""Scale-out: expert parallelism over torch.distributed all-to-all, under Lightning DDP or FSDP2 (dense part).

Rank r of an expert-parallel group of P ranks holds experts ``[r*E/P, (r+1)*E/P)`` of every MoE layer;
routing (groups, capacity, BPR, auxiliary losses) stays local to each rank, exactly as on one device.
"""
from .alltoall import ExpertParallel, ExpertParallelDispatch, all_to_all
from .dcp import dcp_to_checkpoint, is_sharded_checkpoint
from .grads import clip_grad_norm_, sync_expert_grads
from .groups import ExpertParallelGroups, new_expert_parallel_groups
from .shard import (expert_parameter_names, expert_parameters, gather_expert_state_dict, gather_optimizer_state,
                    shard_expert_state_dict, shard_experts, shard_optimizer_state, sharded_layers, unshard_experts)

__all__ = [
    "ExpertParallel", "ExpertParallelDispatch", "all_to_all", "clip_grad_norm_", "sync_expert_grads", "ExpertParallelGroups",
    "dcp_to_checkpoint", "is_sharded_checkpoint",
    "new_expert_parallel_groups", "expert_parameter_names", "expert_parameters", "gather_expert_state_dict",
    "gather_optimizer_state", "shard_expert_state_dict", "shard_experts", "shard_optimizer_state",
    "sharded_layers", "unshard_experts", "ExpertParallelDDPStrategy", "ExpertParallelFSDPStrategy",
]


def __getattr__(name: str):
    # Lightning is imported only when the strategy is asked for: the worker processes of plain
    # torch.distributed programs need just the layer side.
    if name == "ExpertParallelDDPStrategy":
        from .strategy import ExpertParallelDDPStrategy
        return ExpertParallelDDPStrategy
    if name == "ExpertParallelFSDPStrategy":
        from .fsdp import ExpertParallelFSDPStrategy
        return ExpertParallelFSDPStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
