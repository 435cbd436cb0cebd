"""Pure routing functions: top_k_routing (the design doc's worked example), route_choices,
expert_choice_routing, group_limited_top_k."""
import pytest
import torch

from vmoe.moe import Routing, top_k_routing
from vmoe.moe.routing import expert_choice_routing, group_limited_top_k, route_choices

# The worked example of docs/design.md ("Slot assignment"): S=3, E=3, K=2, C=2.
GATES = torch.tensor([[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]])


def test_spec_example_vanilla():
    r = top_k_routing(GATES, k=2, capacity=2, batch_priority=False)
    assert r.expert_index.tolist() == [[0, 2], [0, 2], [2, 0]]
    # token 0 -> (e0 slot 0, e2 slot 1); token 1 -> (e0 slot 1, e2 dropped); token 2 -> (e2 slot 0, e0 dropped)
    assert r.slot_index.tolist() == [[0, 1], [1, -1], [0, -1]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.4, 0.2], [0.5, 0.0], [0.6, 0.0]]))


def test_spec_example_batch_priority():
    r = top_k_routing(GATES, k=2, capacity=2, batch_priority=True)
    # priority order 2, 1, 0: token 2 -> (e2 slot 0, e0 dropped); token 1 -> (e0 slot 0, e2 slot 1);
    # token 0 -> (e0 slot 1, e2 dropped)
    assert r.expert_index.tolist() == [[0, 2], [0, 2], [2, 0]]
    assert r.slot_index.tolist() == [[1, -1], [0, 1], [0, -1]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.4, 0.0], [0.5, 0.4], [0.6, 0.0]]))


def test_groups_are_independent_and_leading_dims_kept():
    other = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])
    gates = torch.stack([GATES, other]).reshape(2, 1, 3, 3)  # two leading dims
    r = top_k_routing(gates, k=2, capacity=2, batch_priority=False)
    assert r.slot_index.shape == (2, 1, 3, 2)
    assert r.slot_index[0, 0].tolist() == [[0, 1], [1, -1], [0, -1]]
    # group 1: 1st choices all e1 -> slots 0, 1, dropped; 2nd choices e0, e0, e2 -> slots 0, 1, 0
    assert r.expert_index[1, 0].tolist() == [[1, 0], [1, 0], [1, 2]]
    assert r.slot_index[1, 0].tolist() == [[0, 0], [1, 1], [-1, 0]]


def test_priority_ties_are_stable():
    gates = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    r = top_k_routing(gates, k=1, capacity=2, batch_priority=True)
    # equal priorities: served in position order
    assert r.slot_index[:, 0].tolist() == [0, 1, -1]


def test_ample_capacity_keeps_everything_and_gradients_flow():
    gates = torch.rand(4, 16, 8).softmax(-1).requires_grad_()
    r = top_k_routing(gates, k=3, capacity=48)
    assert bool(r.kept.all())
    r.combine_weights.sum().backward()
    # gradient 1 exactly at the top-3 entries of each token, 0 elsewhere
    assert gates.grad.sum().item() == pytest.approx(4 * 16 * 3)


def test_every_expert_respects_capacity():
    gates = torch.rand(3, 50, 5)
    for bpr in (False, True):
        r = top_k_routing(gates, k=2, capacity=7, batch_priority=bpr)
        for g in range(3):
            for e in range(5):
                slots = r.slot_index[g][(r.expert_index[g] == e) & r.kept[g]]
                assert sorted(slots.tolist()) == list(range(len(slots)))
                assert len(slots) <= 7


def test_routing_reshape():
    r = top_k_routing(torch.rand(6, 4), k=2, capacity=4)
    assert r.reshape(2, 3).expert_index.shape == (2, 3, 2)
    assert isinstance(r.reshape(2, 3), Routing)


@pytest.mark.parametrize("k", [0, 4])
def test_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        top_k_routing(GATES, k=k, capacity=2)


def test_bad_capacity_and_shape():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        top_k_routing(GATES, k=1, capacity=0)
    with pytest.raises(ValueError, match=r"\[\.\.\., S, E\]"):
        top_k_routing(torch.rand(3), k=1, capacity=1)


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
