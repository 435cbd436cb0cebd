"""The slot assignment without a stable sort (what ONNX export uses) equals top_k_routing / assign_slots,
also on ties of experts and of BPR priorities."""
import pytest
import torch

from vmoe.moe import top_k_routing
from vmoe.moe.routing import assign_slots, assign_slots_unique_keys, priority_order, route_choices


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bpr", [False, True])
def test_unique_keys_equal_top_k_routing_with_ties(seed, bpr):
    gen = torch.Generator().manual_seed(seed)
    g, s, e = 3, int(torch.randint(5, 60, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen))
    k = int(torch.randint(1, e + 1, (1,), generator=gen))
    # Few distinct gate values: many tokens share their top gate (BPR ties) and their experts.
    gates = torch.randint(0, 4, (g, s, e), generator=gen).float() / 4
    capacity = int(torch.randint(1, max(2, s * k // e + 2), (1,), generator=gen))
    routing = top_k_routing(gates, k, capacity, batch_priority=bpr)
    values = torch.gather(gates, -1, routing.expert_index)
    priority = values[..., 0] if bpr else None
    slots = assign_slots_unique_keys(routing.expert_index, e, capacity, priority)
    assert torch.equal(slots, routing.slot_index)
    assert bool((routing.slot_index < 0).any()) or capacity * e >= s * k  # the cases really drop


def test_priority_order_is_the_stable_descending_sort():
    gen = torch.Generator().manual_seed(0)
    priority = torch.randint(0, 3, (4, 50), generator=gen).float()
    priority[0, :5] = -0.0  # -0.0 == 0.0: a tie, as in the stable sort
    priority[0, 5:10] = 0.0
    want = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    assert torch.equal(priority_order(priority), want)


def test_unique_keys_with_unkept_choices_and_large_groups():
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(0, 5, (2, 700, 2), generator=gen)
    keep = torch.rand(2, 700, 2, generator=gen) > 0.3
    virtual = torch.where(keep, index, torch.full_like(index, 5))
    priority = torch.rand(2, 700, generator=gen).round(decimals=1)
    for p in (None, priority):
        assert torch.equal(assign_slots_unique_keys(virtual, 6, 90, p), assign_slots(virtual, 6, 90, p))


def test_route_choices_takes_the_unique_keys_while_exporting(monkeypatch):
    calls = []
    import vmoe.moe.routing as routing_module

    real = routing_module.assign_slots_unique_keys
    monkeypatch.setattr(routing_module, "assign_slots_unique_keys", lambda *a: calls.append(1) or real(*a))
    index = torch.tensor([[[0], [0], [1]]])
    weights = torch.tensor([[[0.2], [0.9], [0.5]]])
    eager = route_choices(index, weights, 2, 1, priority=weights[..., 0])
    assert not calls
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported = route_choices(index, weights, 2, 1, priority=weights[..., 0])
    assert calls and torch.equal(exported.slot_index, eager.slot_index)
    assert exported.slot_index[..., 0].tolist() == [[-1, 0, 0]]
