"""Process groups for expert parallelism: who holds which experts, who averages what.

With W data-parallel ranks and an expert-parallel size P (P divides W), the ranks form W/P
expert-parallel groups of P consecutive ranks, ``[i*P, (i+1)*P)``. Inside one group, rank r (its rank in
the group) holds the experts ``[r*E/P, (r+1)*E/P)`` of every MoE layer and tokens travel between the
group's ranks with all-to-all. Ranks with the same position in different groups hold the same experts
(a replica group of W/P ranks) and sum their expert gradients. Dense parameters stay data parallel over
all W ranks (DDP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["ExpertParallelGroups", "new_expert_parallel_groups"]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's view of the expert-parallel layout.

    ep_group / ep_rank / ep_size: the group whose ranks exchange tokens (P = ep_size).
    replica_group / num_replicas: the ranks holding the same experts (None when W == P).
    dp_size: W, the number of data-parallel ranks whose gradient mean DDP takes.
    global_rank: this rank in the default group.
    """

    ep_group: dist.ProcessGroup | None
    ep_rank: int
    ep_size: int
    replica_group: dist.ProcessGroup | None
    num_replicas: int
    dp_size: int
    global_rank: int


def new_expert_parallel_groups(ep_size: int | None = None) -> ExpertParallelGroups:
    """Create the groups on the initialised default process group; every rank must call this together.

    ep_size: experts are spread over this many ranks (None: all ranks). The groups are new process groups
    even when they span the whole world, so that the all-to-alls never interleave with DDP's all-reduces
    on the default group (collectives on one group must be issued in the same order on every rank).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed default process group "
                           "(run under a Lightning DDP strategy or call dist.init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_size = world if ep_size is None else int(ep_size)
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"expert_parallel_size={ep_size} must be a positive divisor of the world size {world} "
                         f"(valid: {[d for d in range(1, world + 1) if world % d == 0]})")
    num_replicas = world // ep_size
    ep_group = replica_group = None
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for i in range(num_replicas):
        group = dist.new_group(list(range(i * ep_size, (i + 1) * ep_size)))
        if rank // ep_size == i:
            ep_group = group
    if num_replicas > 1:
        for j in range(ep_size):
            group = dist.new_group(list(range(j, world, ep_size)))
            if rank % ep_size == j:
                replica_group = group
    return ExpertParallelGroups(ep_group=ep_group, ep_rank=rank % ep_size, ep_size=ep_size,
                                replica_group=replica_group, num_replicas=num_replicas, dp_size=world,
                                global_rank=rank)
