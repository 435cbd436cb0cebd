"""Every routing scheme builds as an MoE block and inside a create_vmoe model, and trains (forward+backward)."""
import math

import pytest
import torch

from vmoe.moe import available_routers, build_moe_mlp, iter_moe_mlps

ROUTERS = available_routers()
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def test_every_scheme_is_registered():
    assert ROUTERS == ["deepseek", "deepseek_v3", "dense", "ensemble", "expert_choice", "gshard", "mixtral", "shazeer",
                       "soft", "switch", "vmoe"]


@pytest.mark.parametrize("router", ROUTERS)
def test_block_forward_backward(router):
    layer = build_moe_mlp(router=router, in_features=16, hidden_features=32, num_experts=4).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    (y.float().square().mean() + layer.aux_loss).backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert x.grad is not None and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert {"tokens_per_expert", "dropped_fraction", "load_cv"} <= set(layer.metrics)
    assert layer.last_routing.expert_index.shape[:2] == (2, 6)
    layer.eval()
    with torch.no_grad():
        assert layer(x).shape == x.shape


@pytest.mark.parametrize("router", ROUTERS)
def test_create_vmoe_with_each_scheme(router):
    models = pytest.importorskip("vmoe.models")
    model = models.create_vmoe("vit_small_patch16_224", moe_layers="every-1", num_experts=[2, 4], router=router,
                               **TINY)
    assert [layer.num_experts for _, layer in iter_moe_mlps(model)] == [2, 4]  # pyramid placement
    out = model(torch.randn(2, 3, 16, 16))
    (out.logsumexp(-1).mean() + models.aux_loss(model)).backward()
    assert out.shape == (2, 5)


def test_create_vmoe_deepseek_structure_through_moe_kwargs():
    models = pytest.importorskip("vmoe.models")
    model = models.create_vmoe("vit_small_patch16_224", moe_layers="last-1", num_experts=4, k=2, router="deepseek",
                               moe_kwargs={"expert_granularity": 2, "num_shared_experts": 1,
                                           "router_kwargs": {"expert_balance_weight": 0.003}}, **TINY)
    layer = model.blocks[1].mlp
    assert (layer.num_experts, layer.k, layer.router.expert_balance_weight) == (8, 4, 0.003)
    assert layer.shared_experts is not None
    model(torch.randn(1, 3, 16, 16)).sum().backward()


def _sig(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


# One group of S=6 tokens, E=2 experts, D=2 with the router weight set to the identity, so token t's
# logits are its input [a_t, 0]: softmax gates [sig(a_t), 1 - sig(a_t)], sigmoid scores [sig(a_t), .5].
A = [1.0, 2.0, 3.0, 0.5, 4.0, -1.0]
TOP1 = [[0], [0], [0], [0], [0], [1]]  # a > 0 prefers e0; t5 (a = -1) prefers e1
# k=1, capacity ceil(6 * 1 * 1.0 / 2) = 3 -> 4 slots: e0 is asked by 5 tokens, so one is dropped.
VANILLA = [[0], [1], [2], [3], [-1], [0]]  # position order: t4 comes 5th
BPR = [[3], [2], [1], [-1], [0], [0]]  # by top gate: t4, t2, t1, t0 get e0; t3 (a = .5) is dropped
SOFTMAX_TOP1 = [[_sig(1.0)], [_sig(2.0)], [_sig(3.0)], [_sig(0.5)], [_sig(4.0)], [_sig(1.0)]]
ONES = [[1.0]] * 6  # weights renormalised over the single chosen expert
# k=2 at capacity factor 0.5: ceil(6 * 2 * .5 / 2) = 3 -> 4 slots. Choice-major: the 1st choices fill e0
# with t0..t3 (t4 dropped) and give t5 e1 slot 0; the 2nd choices give t0..t2 e1 slots 1..3, the rest drop.
TOP2_INDEX = [[0, 1]] * 5 + [[1, 0]]
TOP2_SLOTS = [[0, 1], [1, 2], [2, 3], [3, -1], [-1, -1], [0, -1]]
TOP2_WEIGHTS = [[_sig(a), 1 - _sig(a)] for a in A[:5]] + [[_sig(1.0), 1 - _sig(1.0)]]
HAND_CASES = {
    # router: (block kwargs, expert_index, slot_index, combine weights before drops)
    "vmoe": (dict(k=1, capacity_factor=1.0), TOP1, VANILLA, SOFTMAX_TOP1),
    "switch": (dict(capacity_factor=1.0, batch_priority=True), TOP1, BPR, SOFTMAX_TOP1),
    "deepseek": (dict(k=1, capacity_factor=1.0), TOP1, VANILLA, SOFTMAX_TOP1),
    "mixtral": (dict(k=1, capacity_factor=1.0), TOP1, VANILLA, ONES),
    # BPR ranks by the combine weight, here 1 for every token: the stable sort keeps position order.
    "shazeer": (dict(k=1, capacity_factor=1.0, batch_priority=True), TOP1, VANILLA, ONES),
    "deepseek_v3": (dict(k=1, capacity_factor=1.0), TOP1, VANILLA, ONES),
    "gshard": (dict(capacity_factor=0.5), TOP2_INDEX, TOP2_SLOTS, TOP2_WEIGHTS),
    "dense": (dict(capacity_factor=0.5), TOP2_INDEX, TOP2_SLOTS, TOP2_WEIGHTS),
    # expert choice, C = min(6, ceil(6 * 1.0 / 2)) = 3: e0 takes its 3 best tokens t4, t2, t1 (slots 0, 1, 2),
    # e1 (score 1 - sig(a)) takes t5, t3, t0. Routing [S, E]: column e is expert e.
    "expert_choice": (dict(capacity_factor=1.0), [[0, 1]] * 6,
                      [[-1, 2], [2, -1], [1, -1], [-1, 1], [0, -1], [-1, 0]],
                      [[_sig(a), 1 - _sig(a)] for a in A]),
    # soft MoE (phi = I, no normalisation): combine = softmax over the 2 slots; the summary is the top-1.
    "soft": (dict(router_kwargs={"normalize": False}), TOP1, [[0]] * 6, SOFTMAX_TOP1),
}


def test_every_scheme_has_a_hand_case():
    assert sorted([*HAND_CASES, "ensemble"]) == ROUTERS  # E³ has its own input layout: the test below


def test_ensemble_block_routing_hand_computed():
    # M=2 members, E=4 (member m owns experts 2m, 2m+1), K=1, D=2; router rows [1,0],[0,1] per member, so
    # token logits are its input [a, b] over the member's two experts. Rows b*M + m of x are member m.
    layer = build_moe_mlp(router="ensemble", in_features=2, hidden_features=4, num_experts=4, k=1,
                          capacity_factor=1.0).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
        layer(torch.tensor([[[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]], [[3.0, 0.0], [-2.0, 0.0], [0.5, 0.0]]]))
    routing = layer.last_routing  # [B*M, T, K]
    # Member 0: e0, e0, e1 (a > 0 picks the member's first expert); member 1: e2, e3, e2. Capacity ceil(6/4)
    # = 2 -> 4 slots, routing rows in (token, member) order: nothing is dropped, slots count per expert.
    assert routing.expert_index[..., 0].tolist() == [[0, 0, 1], [2, 3, 2]]
    assert routing.slot_index[..., 0].tolist() == [[0, 1, 0], [0, 0, 1]]
    expected = [[_sig(1.0), _sig(2.0), _sig(1.0)], [_sig(3.0), _sig(2.0), _sig(0.5)]]
    torch.testing.assert_close(routing.combine_weights[..., 0], torch.tensor(expected))


@pytest.mark.parametrize("router", sorted(HAND_CASES))
def test_block_routing_hand_computed(router):
    kwargs, index, slots, weights = HAND_CASES[router]
    layer = build_moe_mlp(router=router, in_features=2, hidden_features=4, num_experts=2, **kwargs).eval()
    with torch.no_grad():
        if router == "soft":
            layer.phi.copy_(torch.eye(2))
        else:
            layer.router.weight.copy_(torch.eye(2))
        layer(torch.tensor([[[a, 0.0] for a in A]]))
    routing = layer.last_routing
    assert routing.expert_index[0].tolist() == index
    assert routing.slot_index[0].tolist() == slots
    kept = torch.tensor(slots) >= 0
    torch.testing.assert_close(routing.combine_weights[0], torch.tensor(weights) * kept)
