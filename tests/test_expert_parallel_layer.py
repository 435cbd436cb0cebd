"""Expert parallelism over real processes (gloo on CPU): outputs and gradients equal the single-process layer.

Each rank routes its own local batch; the reference is the unsharded layer, with the same full weights
and the same router noise, run on that rank's local batch alone. Expert gradients after
``sync_expert_grads`` must equal the MEAN over ranks of the reference gradients (DDP's semantics).
"""
import copy
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vmoe.distributed import (ExpertParallelGroups, gather_expert_state_dict, new_expert_parallel_groups,
                              shard_expert_state_dict, shard_experts, sync_expert_grads, unshard_experts)
from vmoe.distributed.alltoall import _block_permutation
from vmoe.moe import MoEMlp, build_moe_mlp

B, T, D, H = 2, 6, 8, 12

# (num_experts, k, capacity_factor, batch_priority, group_size, training, starve): starve biases the
# router so that the experts of the last rank get no token from anyone (empty all-to-all splits).
CASES = [
    (4, 2, 1.0, False, None, True, False),
    (8, 1, 0.5, True, 6, True, False),
    (4, 2, 2.0, False, 4, False, False),
    (4, 1, 4.0, False, None, True, True),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_of(layer, x, w):
    y = layer(x)
    return y, (y * w).sum() + 10 * layer.aux_loss


def check_case(case, groups: ExpertParallelGroups, world: int):
    num_experts, k, factor, bpr, group_size, training, starve = case
    torch.manual_seed(0)  # identical full weights and data on every rank
    full = MoEMlp(D, H, num_experts=num_experts, k=k, capacity_factor=factor, eval_capacity_factor=factor,
                  batch_priority=bpr, group_size=group_size, noise_std=1.0).train(training)
    xs = torch.randn(world, B, T, D)
    if starve:  # positive inputs and signed router rows: the last rank's experts always lose
        xs = xs.abs() + 0.1
        with torch.no_grad():
            full.router.weight.fill_(1.0)[-num_experts // groups.ep_size:] = -1.0
    ws = torch.randn(world, B, T, D)

    # Single-process reference for every rank's local batch (the noise seed depends on the rank only).
    ref = []
    for r in range(world):
        layer = copy.deepcopy(full)
        x = xs[r].clone().requires_grad_()
        torch.manual_seed(100 + r)
        y, loss = loss_of(layer, x, ws[r])
        loss.backward()
        ref.append((y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()},
                    layer.metrics["tokens_per_expert"]))

    rank = dist.get_rank()
    layer = copy.deepcopy(full)
    assert shard_experts(layer, groups) == [""]
    hook = layer.expert_parallel
    local = slice(hook.expert_range.start, hook.expert_range.stop)
    assert layer.experts.fc1_weight.shape == (num_experts // groups.ep_size, H, D)
    x = xs[rank].clone().requires_grad_()
    torch.manual_seed(100 + rank)
    y, loss = loss_of(layer, x, ws[rank])
    loss.backward()
    y_ref, gx_ref, g_ref, tokens_ref = ref[rank]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, g_ref["router.weight"], atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.metrics["tokens_per_expert"], tokens_ref)
    if starve:
        assert tokens_ref[-num_experts // groups.ep_size:].sum() == 0

    # Before the sync an expert holds the SUM over its group's ranks; after it, the mean over all ranks.
    group_ranks = range(rank - groups.ep_rank, rank - groups.ep_rank + groups.ep_size)
    for name, p in layer.experts.named_parameters():
        key = f"experts.{name}"
        summed = sum(ref[r][2][key] for r in group_ranks)[local]
        grad = torch.zeros_like(p) if p.grad is None else p.grad  # None: no token reached this shard
        torch.testing.assert_close(grad, summed, atol=1e-5, rtol=1e-5, msg=key)
    sync_expert_grads(layer)
    for name, p in layer.experts.named_parameters():
        key = f"experts.{name}"
        mean = (sum(ref[r][2][key] for r in range(world)) / world)[local]
        torch.testing.assert_close(p.grad, mean, atol=1e-5, rtol=1e-5, msg=key)
    assert layer.experts.fc2_weight.grad.abs().sum() > 0 or starve

    # The full state dict comes back from the shards, and slicing it again gives this rank's shard.
    gathered = gather_expert_state_dict(layer, layer.state_dict())
    for key, value in full.state_dict().items():
        assert torch.equal(gathered[key], value), key
    resharded = shard_expert_state_dict(layer, gathered)
    for key, value in layer.state_dict().items():
        assert torch.equal(resharded[key], value), key
    unshard_experts(layer)
    assert layer.expert_parallel is None and layer.experts.num_experts == num_experts
    for key, value in full.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


def worker(rank: int, world: int, ep_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        groups = new_expert_parallel_groups(ep_size)
        assert groups.ep_size == ep_size and groups.num_replicas == world // ep_size
        for case in CASES:
            check_case(case, groups, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2)])
def test_expert_parallel_layer_matches_single_process(world, ep_size):
    """2 ranks: experts split in halves. 4 ranks, P=2: two replica groups that also sum expert grads."""
    mp.spawn(worker, args=(world, ep_size, free_port()), nprocs=world, join=True)


def test_block_permutation_makes_local_experts_contiguous():
    # 2 sources x 3 local experts; buffer rows are labelled (source, expert) in source-major order.
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])
    labels = [(p, j) for p in range(2) for j in range(3) for _ in range(int(counts[p, j]))]
    perm = _block_permutation(counts)
    assert [labels[i] for i in perm.tolist()] == [(0, 0), (0, 0), (1, 0), (1, 1), (1, 1), (1, 1), (0, 2)]
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]


def test_expert_parallel_needs_initialised_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        new_expert_parallel_groups(2)


def fake_groups(ep_size: int, ep_rank: int) -> ExpertParallelGroups:
    """A layout without communication (dp_size 1: no broadcast), enough to slice and reshard."""
    return ExpertParallelGroups(ep_group=None, ep_rank=ep_rank, ep_size=ep_size, replica_group=None,
                                num_replicas=1, dp_size=1, global_rank=0)


def test_shard_experts_keeps_the_rank_slice_and_reshards_full_state_dicts():
    full = MoEMlp(D, H, num_experts=4, k=2)
    layer = copy.deepcopy(full)
    shard_experts(layer, fake_groups(2, 1))
    hook = layer.expert_parallel
    assert (hook.world_size, hook.num_local_experts, list(hook.expert_range)) == (2, 2, [2, 3])
    assert torch.equal(layer.experts.fc1_weight, full.experts.fc1_weight[2:])
    assert layer.experts.num_experts == 2 and layer.num_experts == 4  # the router still scores all 4
    assert torch.equal(layer.router.weight, full.router.weight)
    resharded = shard_expert_state_dict(layer, full.state_dict())
    assert torch.equal(resharded["experts.fc2_bias"], full.experts.fc2_bias[2:])
    layer.load_state_dict(resharded)
    with pytest.raises(ValueError, match="full expert set"):
        shard_expert_state_dict(layer, layer.state_dict())  # a shard is not a checkpoint
    shard_experts(layer, fake_groups(2, 1))  # same layout again: no-op
    with pytest.raises(ValueError, match="another layout"):
        shard_experts(layer, fake_groups(4, 1))


def test_shard_experts_rejects_bad_layouts():
    with pytest.raises(ValueError, match="not divisible by the expert-parallel size 3"):
        shard_experts(MoEMlp(D, H, num_experts=4, k=2), fake_groups(3, 0))

    soft = build_moe_mlp(router="soft", in_features=D, hidden_features=H, num_experts=4)
    with pytest.raises(ValueError, match=r"\(SoftMoEMlp\) does not support expert parallelism"):
        shard_experts(torch.nn.Sequential(soft), fake_groups(2, 0))


def test_expert_parallel_size_must_divide_world():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"expert_parallel_size=2 .*\(valid: \[1\]\)"):
            new_expert_parallel_groups(2)
        groups = new_expert_parallel_groups()
        assert (groups.ep_size, groups.num_replicas, groups.dp_size) == (1, 1, 1)
        layer = MoEMlp(D, H, num_experts=4, k=2)
        plain = copy.deepcopy(layer)
        shard_experts(layer, groups)  # P = 1: every expert local, no all-to-all
        x = torch.randn(B, T, D)
        layer.eval(), plain.eval()
        torch.testing.assert_close(layer(x), plain(x))
    finally:
        dist.destroy_process_group()


def test_strategy_arguments_and_registry():
    from lightning.pytorch.strategies import StrategyRegistry

    from vmoe.distributed import ExpertParallelDDPStrategy

    assert "ddp_expert_parallel" in StrategyRegistry
    with pytest.raises(ValueError, match="popen"):
        ExpertParallelDDPStrategy(start_method="spawn")
    with pytest.raises(ValueError, match="expert_parallel_size"):
        ExpertParallelDDPStrategy(expert_parallel_size=0)
