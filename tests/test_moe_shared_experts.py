"""Expert structure around the routed experts (vmoe/moe/shared_experts.py): DeepSeekMoE fine-grained
segmentation and shared experts, DeepSpeed residual MoE."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vmoe.moe import MoEMlp

D, H = 16, 64


def count(module):
    return sum(p.numel() for p in module.parameters())


def expert_flops(layer, x):
    with FlopCounterMode(display=False) as counter:
        layer(x)
    return sum(counter.get_flop_counts()["MoEMlp.experts"].values())


@pytest.mark.parametrize("bias", [False, True])
def test_fine_grained_m4_same_expert_params_and_flops_as_m1(bias):
    # A capacity factor large enough that nothing is dropped, so FLOPs count every choice.
    kw = dict(num_experts=4, k=2, router="deepseek", capacity_factor=8.0, bias=bias)
    m1, m4 = MoEMlp(D, H, **kw), MoEMlp(D, H, expert_granularity=4, **kw)
    assert (m4.num_experts, m4.k, m4.experts.hidden_features) == (16, 8, 16)
    # Weights: E*H*D*2 = 4*64*16*2 = 8192 for both; fc1 bias E*H = 256 for both. Each segment has its own
    # fc2 bias, so biases add (m-1)*E*D = 192. The router grows from E*D = 64 to m*E*D = 256 (as in the paper).
    extra = 3 * 4 * D if bias else 0
    assert count(m4.experts) == count(m1.experts) + extra
    assert count(m1.experts) == 8192 + (256 + 64 if bias else 0)
    assert (count(m1.router), count(m4.router)) == (64, 256)
    # Forward expert FLOPs: N*K*(2*D*H + 2*H*D) = 20*2*4096 = 163840 = N*(m*K)*(4*D*H/m).
    x = torch.randn(2, 10, D)
    assert expert_flops(m1, x) == expert_flops(m4, x) == 163840
    assert float(m4.metrics["dropped_fraction"]) == 0


def test_fine_grained_checks():
    with pytest.raises(ValueError, match="expert_granularity=3 must divide the expert hidden width H=64"):
        MoEMlp(D, H, expert_granularity=3)
    with pytest.raises(ValueError, match="router 'expert_choice' has no per-token k"):
        MoEMlp(D, H, router="expert_choice", expert_granularity=2)
    assert MoEMlp(D, H, num_experts=4, expert_granularity=2).k == 4  # vmoe's default k=2, times m


def test_shared_experts_are_added_to_the_routed_output():
    torch.manual_seed(0)
    layer = MoEMlp(D, H, num_experts=4, k=2, router="deepseek", expert_granularity=2, num_shared_experts=2).eval()
    # K_s = 2 shared experts of hidden H/m = 32 stored as one MLP of hidden 64.
    assert layer.shared_experts.fc1.weight.shape == (64, D)
    x = torch.randn(2, 6, D)
    y = layer(x)
    shared, layer.shared_experts = layer.shared_experts, None
    routed = layer(x)
    torch.testing.assert_close(y, routed + shared(x))
    # The single MLP equals the sum of the two experts (fc2 bias split between them).
    f1w, f1b, f2w, f2b = shared.fc1.weight, shared.fc1.bias, shared.fc2.weight, shared.fc2.bias
    act = torch.nn.functional.gelu
    parts = [act(x @ f1w[i:i + 32].T + f1b[i:i + 32]) @ f2w[:, i:i + 32].T + f2b / 2 for i in (0, 32)]
    torch.testing.assert_close(shared(x), parts[0] + parts[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("coefficient", [False, True])
def test_residual_moe(coefficient):
    torch.manual_seed(0)
    layer = MoEMlp(D, H, num_experts=4, k=1, residual=True, residual_coefficient=coefficient).eval()
    assert layer.residual.mlp.fc1.weight.shape == (H, D)  # the dense MLP is one full-size expert
    x = torch.randn(2, 6, D)
    y = layer(x)
    residual, layer.residual = layer.residual, None
    moe = layer(x)
    dense = residual.mlp(x)
    if coefficient:
        mix = residual.coefficient(x).softmax(-1)
        torch.testing.assert_close(y, mix[..., :1] * moe + mix[..., 1:] * dense)
    else:
        torch.testing.assert_close(y, moe + dense)
    with pytest.raises(ValueError, match="residual_coefficient=True needs residual=True"):
        MoEMlp(D, H, residual_coefficient=True)
