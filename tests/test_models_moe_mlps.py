"""Model-level helpers: aux_loss, set_routing, capture_routing."""
import pytest
import timm
import torch

from vmoe.models import aux_loss, capture_routing, create_vmoe, set_routing

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def test_capture_routing_shapes_and_hook_removal():
    model = create_vmoe("vit_small_patch16_224", moe_layers=[0, 3], num_experts=4, k=2, **ARCH)
    x = torch.randn(3, 3, 16, 16)
    with capture_routing(model) as routes:
        model(x)
        assert sorted(routes) == [0, 3]
        for r in routes.values():
            assert r.expert_index.shape == r.slot_index.shape == r.combine_weights.shape == (3, 17, 2)
            assert not r.combine_weights.requires_grad
            assert ((r.slot_index >= 0) | (r.combine_weights == 0)).all()
        first = routes[0].expert_index.clone()
        model(x[:1])  # the dict holds the latest forward
        assert routes[0].expert_index.shape == (1, 17, 2)
    assert all(not block.mlp._forward_hooks for block in model.blocks)
    model(x)
    assert routes[0].expert_index.shape == (1, 17, 2)  # no longer updated after the with
    assert first.max() < 4
    with pytest.raises(RuntimeError, match="boom"), capture_routing(model):
        raise RuntimeError("boom")
    assert not model.blocks[0].mlp._forward_hooks
    with pytest.raises(ValueError, match="no MoE layers"), capture_routing(timm.create_model(
            "vit_small_patch16_224", **ARCH)):
        pass


def test_aux_loss_is_sum_over_layers_in_graph():
    model = create_vmoe("vit_small_patch16_224", moe_layers="every-1", num_experts=4, **ARCH)
    model(torch.randn(2, 3, 16, 16))
    expected = sum(block.mlp.aux_loss for block in model.blocks)
    loss = aux_loss(model)
    assert torch.allclose(loss, expected) and loss.requires_grad and loss > 0
    loss.backward()
    assert model.blocks[2].mlp.router.weight.grad is not None
    assert aux_loss(timm.create_model("vit_small_patch16_224", **ARCH)).item() == 0.0


def test_set_routing_on_every_layer():
    model = create_vmoe("vit_small_patch16_224", num_experts=4, capacity_factor=1.0, **ARCH)
    assert set_routing(model, eval_capacity_factor=0.5, batch_priority=True) == 2
    for i in (1, 3):
        mlp = model.blocks[i].mlp
        s = mlp.settings
        assert (s.capacity_factor, s.eval_capacity_factor, s.batch_priority) == (1.0, 0.5, True)
    model.eval()
    with torch.no_grad(), capture_routing(model) as routes:
        model(torch.randn(2, 3, 16, 16))
    # eval capacity: ceil(34 tokens * 2 * 0.5 / 4) = 9 -> 12 slots per expert (multiple of 4)
    assert int((routes[1].slot_index >= 0).sum()) <= 4 * 12 and routes[1].slot_index.max() <= 11
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        set_routing(model, capacity_factor=0)
    with pytest.raises(ValueError, match="no MoE layers"):
        set_routing(timm.create_model("vit_small_patch16_224", **ARCH), batch_priority=True)
