"""Pure routing functions of the family: route_choices, expert_choice_routing, group_limited_top_k."""
import pytest
import torch

from vmoe.moe.routing import expert_choice_routing, group_limited_top_k, route_choices


def test_route_choices_unkept_choice_frees_its_slot():
    # S=3, E=2, K=2, C=2; choice-major. 1st choices: t0->e0 s0, t1->e1 s0, t2->e0 s1.
    # 2nd choices: t0->e1 s1, t1->e0 full, t2->e1 full.
    index = torch.tensor([[0, 1], [1, 0], [0, 1]])
    weights = torch.tensor([[.6, .4], [.7, .3], [.5, .5]])
    r = route_choices(index, weights, 2, 2)
    assert r.slot_index.tolist() == [[0, 1], [0, -1], [1, -1]]
    # Skipping t0's 2nd choice leaves e1's 2nd slot to t2's 2nd choice.
    keep = torch.tensor([[True, False], [True, True], [True, True]])
    r = route_choices(index, weights, 2, 2, keep=keep)
    assert r.slot_index.tolist() == [[0, -1], [0, -1], [1, 1]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[.6, 0], [.7, 0], [.5, .5]]))


def test_route_choices_priority_and_groups():
    # Two groups; priority serves token 2 first in group 0 (C=1, K=1, all want e0).
    index = torch.zeros(2, 3, 1, dtype=torch.long)
    weights = torch.ones(2, 3, 1)
    priority = torch.tensor([[.1, .2, .9], [.3, .2, .1]])
    r = route_choices(index, weights, 1, 1, priority=priority)
    assert r.slot_index[..., 0].tolist() == [[-1, -1, 0], [0, -1, -1]]
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        route_choices(index, weights, 1, 0)


def test_expert_choice_routing_hand_example():
    # S=4, E=2, C=2. Expert 0 takes t0 (.9), t3 (.8); expert 1 takes t0 (.6), t1 (.5); t2 gets none.
    scores = torch.tensor([[.9, .6], [.5, .5], [.3, .1], [.8, .2]])
    r = expert_choice_routing(scores, 2)
    assert r.expert_index.tolist() == [[0, 1]] * 4
    assert r.slot_index.tolist() == [[0, 0], [-1, 1], [-1, -1], [1, -1]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[.9, .6], [0, .5], [0, 0], [.8, 0]]))
    assert r.kept.sum(-1).tolist() == [2, 1, 0, 1]  # a token gets 0..E experts
    with pytest.raises(ValueError, match=r"capacity must be in \[1, S=4\]"):
        expert_choice_routing(scores, 5)


def test_group_limited_top_k():
    # E=6 in 3 groups {0,1} {2,3} {4,5}; group score = sum of its 2 best: .9, .95, .7.
    scores = torch.tensor([[.9, .0, .5, .45, .6, .1]])
    values, index = group_limited_top_k(scores, 2, num_groups=3, topk_groups=1)
    assert index.tolist() == [[2, 3]]  # only group 1, although e0 and e4 score higher
    torch.testing.assert_close(values, torch.tensor([[.5, .45]]))
    _, index = group_limited_top_k(scores, 2, num_groups=3, topk_groups=2)  # groups 1 and 0
    assert index.tolist() == [[0, 2]]
    _, index = group_limited_top_k(scores, 2, num_groups=3)  # all groups = plain top-k
    assert index.tolist() == [[0, 4]]
    with pytest.raises(ValueError, match="num_groups must be >= 1 and divide the number of experts 6, got 4"):
        group_limited_top_k(scores, 2, num_groups=4)
    with pytest.raises(ValueError, match=r"k must be in \[1, topk_groups \* experts per group = 2\], got 3"):
        group_limited_top_k(scores, 3, num_groups=3, topk_groups=1)
