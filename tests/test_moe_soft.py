"""Soft MoE block against a plain per-group implementation of the paper's equations."""
import pytest
import torch
import torch.nn.functional as F

from vmoe.moe import SoftMoEMlp, build_moe_mlp


def reference(layer, x):
    """Y = C (f(D^T X)) per image, with D = softmax over tokens and C = softmax over slots."""
    out = []
    p = layer.slots_per_expert
    phi = layer.scale * F.normalize(layer.phi, dim=0) if layer.normalize else layer.phi
    for tokens in x:  # [T, D]
        inputs = F.normalize(tokens, dim=-1) if layer.normalize else tokens
        logits = inputs @ phi  # [T, E*p]
        dispatch, combine = logits.softmax(0), logits.softmax(1)
        slots = dispatch.T @ tokens  # [E*p, D]
        outputs = torch.stack([layer.experts.forward_expert(j // p, slots[j:j + 1])[0] for j in range(len(slots))])
        out.append(combine @ outputs)
    return torch.stack(out)


@pytest.mark.parametrize("slots, normalize", [(1, True), (2, False)])
def test_soft_moe_matches_reference(slots, normalize):
    torch.manual_seed(0)
    layer = build_moe_mlp(router="soft", in_features=8, hidden_features=16, num_experts=3, group_size=5,
                          router_kwargs={"slots_per_expert": slots, "normalize": normalize})
    assert isinstance(layer, SoftMoEMlp) and layer.phi.shape == (8, 3 * slots)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, reference(layer, x), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert layer.phi.grad.abs().sum() > 0 and x.grad is not None
    # Each token's combine weights sum to 1 over the slots, so the soft token counts sum to B*T.
    torch.testing.assert_close(layer.metrics["tokens_per_expert"].sum(), torch.tensor(10.0))
    assert layer.aux_loss.item() == 0 and layer.metrics["dropped_fraction"] == 0
    r = layer.last_routing
    assert r.expert_index.shape == (2, 5, 1) and r.kept.all() and (r.slot_index < slots).all()


def test_soft_moe_group_is_the_whole_forward_unless_set_and_one_image_in_a_vmoe():
    torch.manual_seed(0)
    layer = build_moe_mlp(router="soft", in_features=8, hidden_features=16, num_experts=2)
    x = torch.randn(3, 4, 8)
    # None = all B*T tokens of the forward, as for every block: images mix
    assert not torch.allclose(layer(x)[:1], layer(x[:1]), atol=1e-4)
    layer.settings = layer.settings.replace(group_size=4)
    torch.testing.assert_close(layer(x)[:1], layer(x[:1]), atol=1e-6, rtol=1e-6)
    from vmoe.models import create_vmoe
    model = create_vmoe("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                        num_classes=3, moe_layers=[1], num_experts=2, router="soft")
    assert model.blocks[1].mlp.group_size == 4 + 1  # a V-MoE routes Soft MoE per image: patches + class token
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(images)[:1], model(images[:1]), atol=1e-5, rtol=1e-5)


def test_soft_moe_routing_settings():
    layer = build_moe_mlp(router="soft", in_features=8, num_experts=2)
    layer.settings = layer.settings.replace(group_size=2)  # the one setting it has
    assert not layer.has_capacity and layer.capacity(4) is None
    with pytest.raises(ValueError, match=r"soft MoE drops nothing .* does not use \['capacity_factor'\]"):
        layer.settings = layer.settings.replace(capacity_factor=1.0)
    with pytest.raises(ValueError, match=r"does not use \['batch_priority'\]"):
        layer.settings = layer.settings.replace(batch_priority=True)
    with pytest.raises(ValueError, match=r"soft MoE does not use \['k', 'noise_std'\]"):
        build_moe_mlp(router="soft", in_features=8, k=2, noise_std=1.0)
