"""MoEMlp(bfloat16_dispatch=True): expert inputs and outputs rounded to bfloat16, combine in float32."""
import torch

from vmoe.models import create_vmoe
from vmoe.moe import MoEMlp
from vmoe.moe.dispatch import DispatchPrecision


def round_to_bfloat16(x):
    return x.to(torch.bfloat16).to(x.dtype)


def test_dispatch_precision_rounds_to_nearest_even_bfloat16_and_returns_float32():
    x = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, 3.0])  # halfway, halfway, below half
    policy = DispatchPrecision(round_to=torch.bfloat16)
    for out in (policy.expert_input(x), policy.expert_output(x, torch.float32)):
        assert out.tolist() == [1.0, 1.0 + 2 ** -6, 1.0, 3.0] and out.dtype == torch.float32


def test_bfloat16_dispatch_rounds_expert_inputs_and_outputs_only():
    torch.manual_seed(0)
    layer = MoEMlp(8, 16, num_experts=4, k=2, capacity_factor=4.0).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        exact = layer(x)
        layer.settings = layer.settings.replace(bfloat16_dispatch=True)
        fast = layer(x)
        layer.dispatch = "reference"
        loop = layer(x)
        routing = layer.last_routing
        want = torch.zeros_like(x)
        for b in range(2):
            for t in range(5):
                for j in range(2):
                    e = int(routing.expert_index[b, t, j])
                    out = layer.experts.forward_expert(e, round_to_bfloat16(x[b, t])[None])[0]
                    want[b, t] += routing.combine_weights[b, t, j] * round_to_bfloat16(out)
    assert fast.dtype == torch.float32 and torch.allclose(fast, want, atol=1e-6) and torch.allclose(loop, want, atol=1e-6)
    assert not torch.allclose(fast, exact, atol=1e-5)  # the rounding really happened
    assert "bfloat16_dispatch=True" in repr(layer)


def test_bfloat16_dispatch_is_off_by_default_and_reachable_from_create_vmoe():
    assert MoEMlp(8, 16, num_experts=4).settings.bfloat16_dispatch is False
    model = create_vmoe("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                        num_classes=3, moe_layers=[1], num_experts=4, bfloat16_dispatch=True)
    assert model.blocks[1].mlp.settings.bfloat16_dispatch is True
    assert model.blocks[1].mlp.dispatch.precision.round_to == torch.bfloat16
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()  # gradients flow through the rounding
    assert model.blocks[1].mlp.experts.fc1_weight.grad.abs().sum() > 0
