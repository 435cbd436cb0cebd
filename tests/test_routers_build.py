"""Every routing scheme builds as an MoE block and inside a create_vmoe model, and trains (forward+backward)."""
import pytest
import torch

from vmoe.moe import available_routers, build_moe_mlp, iter_moe_layers

ROUTERS = available_routers()
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def test_every_scheme_is_registered():
    assert ROUTERS == ["deepseek", "deepseek_v3", "dense", "ensemble", "expert_choice", "gshard", "mixtral", "shazeer", "soft",
                       "switch", "vmoe"]


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
    assert [layer.num_experts for _, layer in iter_moe_layers(model)] == [2, 4]  # pyramid placement
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
