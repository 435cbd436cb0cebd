"""The per-patch arrays the routing pictures draw, checked on hand-computed routings."""
import numpy as np
import pytest
import torch

from vmoe.moe import Routing, top_k_routing
from vmoe.viz.status import (DROPPED, KEPT, PARTIAL, class_expert_counts, expert_load, patch_status, row_shares,
                             status_counts, to_patch_grid, token_status, top1_expert_map)


def routing_from_slots(expert, slot):
    expert, slot = torch.tensor(expert), torch.tensor(slot)
    return Routing(expert, slot, (slot >= 0).float() * 0.5)


def test_token_status_codes():
    # one image, 4 tokens, K=2: both kept / 2nd lost / both lost / 1st lost but 2nd kept
    r = routing_from_slots([[[0, 1], [1, 0], [2, 0], [1, 2]]], [[[0, 1], [0, -1], [-1, -1], [-1, 2]]])
    assert token_status(r).tolist() == [[KEPT, PARTIAL, DROPPED, PARTIAL]]


def test_spec_worked_example_vanilla_and_bpr():
    gates = torch.tensor([[.4, 0, .2], [.5, .1, .4], [.3, .2, .6]])
    vanilla = top_k_routing(gates, k=2, capacity=2).reshape(1, 3)
    bpr = top_k_routing(gates, k=2, capacity=2, batch_priority=True).reshape(1, 3)
    assert token_status(vanilla).tolist() == [[KEPT, PARTIAL, PARTIAL]]
    assert token_status(bpr).tolist() == [[PARTIAL, KEPT, PARTIAL]]


def test_patch_status_drops_prefix_and_lays_out_row_major():
    # CLS + 2x2 patches; CLS lost everything but must not appear in the grid.
    slot = [[[-1], [0], [-1], [1], [2]], [[0], [-1], [-1], [-1], [3]]]
    r = routing_from_slots([[[0]] * 5] * 2, slot)
    grid = patch_status(r, (2, 2), num_prefix_tokens=1)
    assert grid.shape == (2, 2, 2)
    assert grid[0].tolist() == [[KEPT, DROPPED], [KEPT, KEPT]]
    assert grid[1].tolist() == [[DROPPED, DROPPED], [DROPPED, KEPT]]
    assert status_counts(grid) == {KEPT: 4, PARTIAL: 0, DROPPED: 4}


def test_patch_grid_rejects_wrong_token_count():
    r = routing_from_slots([[[0]] * 5], [[[0]] * 5])
    with pytest.raises(ValueError, match="T=5.*2x3"):
        patch_status(r, (2, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        to_patch_grid(np.zeros((1, 5)), (2, 2), -1)
    with pytest.raises(ValueError, match=r"\[B, T, K\]"):
        token_status(Routing(*(torch.zeros(5, 1, dtype=torch.long),) * 3))


def test_top1_expert_map_uses_first_choice_even_when_dropped():
    r = routing_from_slots([[[9, 9], [3, 1], [2, 0], [1, 3], [0, 2]]], [[[0, 0], [-1, 0], [0, 0], [0, -1], [1, 1]]])
    assert top1_expert_map(r, (2, 2), 1).tolist() == [[[3, 2], [1, 0]]]


def test_expert_load_counts_by_rank():
    r = routing_from_slots([[[0, 1], [0, 2], [1, 0]]], [[[0, 0], [1, -1], [-1, 2]]])
    kept, dropped = expert_load(r, num_experts=3)
    assert kept.tolist() == [[2, 0, 0], [1, 1, 0]]
    assert dropped.tolist() == [[0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="num_experts=2"):
        expert_load(r, num_experts=2)


def test_class_expert_counts_and_shares():
    # two images (classes 1 and 0), CLS + 2 patches, K=2; CLS choices are ignored.
    expert = [[[3, 3], [0, 1], [0, 2]], [[3, 3], [2, 1], [2, 0]]]
    r = routing_from_slots(expert, [[[0, 0]] * 3] * 2)
    counts = class_expert_counts(r, torch.tensor([1, 0]), num_classes=3, num_experts=4, num_prefix_tokens=1)
    assert counts.tolist() == [[1, 1, 2, 0], [2, 1, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(row_shares(counts), [[.25, .25, .5, 0], [.5, .25, .25, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        class_expert_counts(r, torch.tensor([1, 3]), 3, 4, 1)
    with pytest.raises(ValueError, match=r"\[B\]=\[2\]"):
        class_expert_counts(r, torch.tensor([1]), 3, 4, 1)
