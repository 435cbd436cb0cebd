import pytest
import torch
from timm.layers import Mlp

from vmoe.moe import MoEMlp, Routing, StackedExperts, combine_reference, moe_combine


def make_layer(**kw):
    args = dict(num_experts=4, k=2, capacity_factor=1.0)
    args.update(kw)
    return MoEMlp(16, 32, **args)


def run_both(layer, x):
    """Outputs and gradients (input, router, experts) of the fast and the reference path."""
    results = []
    for reference in (False, True):
        layer.zero_grad()
        xi = x.detach().clone().requires_grad_()
        layer.dispatch = "reference" if reference else "sorted"
        torch.manual_seed(1)  # same router noise in training mode
        y = layer(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results.append((y.detach(), xi.grad.clone(), grads))
    layer.dispatch = "auto"
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 24, 12])
@pytest.mark.parametrize("training", [False, True])
def test_fast_path_equals_reference(dtype, group_size, training):
    layer = make_layer(capacity_factor=0.5, eval_capacity_factor=0.5, group_size=group_size).to(dtype)
    layer.train(training)
    x = torch.randn(4, 12, 16, dtype=dtype)
    (y1, gx1, g1), (y2, gx2, g2) = run_both(layer, x)
    assert float(layer.metrics["dropped_fraction"]) > 0  # capacity 0.5 drops assignments
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(gx1, gx2, **tol)
    assert set(g1) == {"router.weight", "experts.fc1_weight", "experts.fc1_bias", "experts.fc2_weight",
                       "experts.fc2_bias"}
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], **tol, msg=name)
    assert g1["router.weight"].abs().sum() > 0  # gradients reach the router through the combine weights


def test_dispatch_with_empty_experts_and_dropped_tokens():
    experts = StackedExperts(5, 8, 12)
    x = torch.randn(4, 8, requires_grad=True)
    # experts 1 and 4 receive nothing; token 3 loses both choices
    routing = Routing(
        expert_index=torch.tensor([[0, 2], [2, 0], [3, 0], [0, 3]]),
        slot_index=torch.tensor([[0, 0], [1, 1], [0, -1], [-1, -1]]),
        combine_weights=torch.tensor([[0.6, 0.3], [0.5, 0.2], [0.9, 0.0], [0.0, 0.0]]),
    )
    fast = moe_combine(x, routing, experts, 5)
    fast.sum().backward()
    gx_fast, gw_fast = x.grad.clone(), experts.fc1_weight.grad.clone()
    x.grad = None
    experts.zero_grad()
    ref = combine_reference(x, routing, experts.forward_expert, 5)
    ref.sum().backward()
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(x.grad, gx_fast)
    torch.testing.assert_close(experts.fc1_weight.grad, gw_fast)
    assert torch.all(fast[3] == 0)  # every choice dropped: nothing but the block's residual
    assert torch.all(gw_fast[1] == 0) and torch.all(gw_fast[4] == 0)
    # token 0 by hand: 0.6 * expert0(x0) + 0.3 * expert2(x0)
    x0 = x[0:1].detach()
    expected = 0.6 * experts.forward_expert(0, x0) + 0.3 * experts.forward_expert(2, x0)
    torch.testing.assert_close(fast[0:1].detach(), expected.detach())


def test_upcycled_experts_equal_dense_mlp_with_ample_capacity():
    dense = Mlp(16, 32)
    layer = make_layer(num_experts=3, k=3, capacity_factor=4.0, noise_std=0.0,
                       router_kwargs={"renormalize": True})
    with torch.no_grad():
        layer.experts.fc1_weight.copy_(dense.fc1.weight.expand(3, -1, -1))
        layer.experts.fc1_bias.copy_(dense.fc1.bias.expand(3, -1))
        layer.experts.fc2_weight.copy_(dense.fc2.weight.expand(3, -1, -1))
        layer.experts.fc2_bias.copy_(dense.fc2.bias.expand(3, -1))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_metrics_and_aux_loss():
    layer = make_layer(capacity_factor=0.25)
    layer.train()
    x = torch.randn(2, 8, 16)
    layer(x)
    m = layer.metrics
    kept = int((layer.last_routing.slot_index >= 0).sum())
    assert m["tokens_per_expert"].sum().item() == kept
    assert m["dropped_fraction"].item() == pytest.approx(1 - kept / (16 * 2))
    lost_all = int((layer.last_routing.slot_index < 0).all(-1).sum())
    assert m["dropped_tokens_fraction"].item() == pytest.approx(lost_all / 16)
    assert layer.last_routing.expert_index.shape == (2, 8, 2)
    assert layer.aux_loss.requires_grad and layer.aux_loss.item() > 0
    assert all(not v.requires_grad for v in m.values())


def test_capacity_settings_change_routing_without_touching_weights():
    layer = make_layer(capacity_factor=2.0, eval_capacity_factor=0.25)
    assert layer.settings.eval_capacity_factor == 0.25
    weights = {name: p.clone() for name, p in layer.state_dict().items()}
    layer.eval()
    x = torch.randn(2, 8, 16)
    layer(x)
    # capacity = ceil(16 * 2 * 0.25 / 4) = 2 -> 4 (multiple of 4): 16 of 32 assignments at most
    assert layer.metrics["tokens_per_expert"].max().item() <= 4
    layer.settings = layer.settings.replace(eval_capacity_factor=2.0)
    layer(x)
    assert layer.metrics["dropped_fraction"].item() == 0
    layer.settings = layer.settings.replace(batch_priority=True)
    assert layer.settings.batch_priority is True and not hasattr(layer.router, "batch_priority")
    assert all(torch.equal(p, weights[name]) for name, p in layer.state_dict().items())
    with pytest.raises(TypeError, match="settings must be a RoutingSettings"):
        layer.settings = {"batch_priority": True}


def test_state_dict_layout():
    sd = MoEMlp(16, 32, num_experts=4).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "router.weight": (4, 16),
        "experts.fc1_weight": (4, 32, 16),
        "experts.fc1_bias": (4, 32),
        "experts.fc2_weight": (4, 16, 32),
        "experts.fc2_bias": (4, 16),
    }


def test_bf16_autocast_keeps_router_in_float32():
    layer = make_layer()
    x = torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.last_routing.combine_weights.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, r"k must be an integer >= 1 or None \(the scheme's default\), got 0"),
        ({"k": 5}, r"k must be in \[1, num_experts=4\], got 5"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0 or None .*, got 0.0"),
        ({"capacity_factor": -1.0}, "capacity_factor must be > 0 or None .*, got -1.0"),
        ({"eval_capacity_factor": 0.0}, "eval_capacity_factor must be > 0 or None"),
        ({"num_experts": 0}, "num_experts must be an integer >= 1, got 0"),
        ({"num_experts": 2.5}, "num_experts must be an integer >= 1, got 2.5"),
        ({"k": 1.5}, r"k must be an integer >= 1 or None .*, got 1.5"),
        ({"noise_std": -0.5}, "noise_std must be >= 0, got -0.5"),
        ({"noise_std": float("nan")}, "noise_std must be >= 0, got nan"),
        ({"noise_std": float("inf")}, "noise_std must be >= 0, got inf; valid: a finite number >= 0"),
        ({"capacity_factor": float("inf")}, "capacity_factor must be > 0 or None .*, got inf; valid: a finite number > 0"),
        ({"capacity_factor": float("nan")}, "capacity_factor must be > 0 or None .*, got nan"),
        ({"eval_capacity_factor": float("inf")}, r"eval_capacity_factor must be > 0 or None \(= capacity_factor\), got inf"),
        ({"group_size": 0}, r"group_size must be an integer >= 1 or None \(the whole local batch\), got 0"),
        ({"group_size": 2.5}, "group_size must be an integer >= 1 or None .*, got 2.5"),
        ({"router": "nope"}, "unknown router 'nope'; valid: .*'vmoe'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layer(**kwargs)


def test_bad_inputs():
    layer = make_layer(group_size=5)
    with pytest.raises(ValueError, match=r"group_size=5 does not divide the B\*T=12 tokens of this forward"):
        layer(torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match=r"expects x of shape \[B, T, D=16\], got \(12, 16\)"):
        layer(torch.randn(12, 16))
    with pytest.raises(ValueError, match=r"expects x of shape \[B, T, D=16\], got \(2, 5, 8\)"):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="capacity_factor must be > 0 or None .*got 0"):
        layer.settings = layer.settings.replace(capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor must be > 0 for router NoisyTopKRouter, got None"):
        layer.settings = layer.settings.replace(capacity_factor=None)
    assert layer.settings.capacity_factor == 1.0  # a refused change leaves the settings as they were (make_layer: 1.0)


@pytest.mark.parametrize("bias", [True, False])
def test_block_function_equals_autograd_loop(bias):
    experts = StackedExperts(4, 8, 12, bias=bias)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 8)
    results = []
    for path in (experts._forward_blocks, experts._forward_loop):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        y = path(xi, counts)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in experts.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(gx1, gx2)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="counts sum to 9 but x has 10 rows"):
        experts._forward_blocks(x, [3, 0, 4, 2])


def test_block_function_frees_hidden_blocks_in_backward_and_a_second_backward_recomputes_them():
    """Backward frees each block's activations when done (peak memory); retain_graph=True still works."""
    torch.manual_seed(0)
    experts = StackedExperts(4, 8, 12, reuse_grad_memory=False)
    counts, x = [3, 0, 5, 2], torch.randn(10, 8, requires_grad=True)
    y = experts._forward_blocks(x, counts)
    hidden = y.grad_fn.hidden
    assert len(hidden) == 6 and all(h is not None for h in hidden)  # (h_pre, act) of 3 non-empty blocks
    weight = torch.randn(y.shape)
    (y * weight).sum().backward(retain_graph=True)
    assert all(h is None for h in hidden)
    first = [x.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
    (y * weight).sum().backward()  # accumulates: the recomputed activations give the same gradients again
    for g, g1 in zip([x.grad] + [p.grad for p in experts.parameters()], first):
        torch.testing.assert_close(g, 2 * g1)


def test_dropout_training_uses_autograd_loop():
    experts = StackedExperts(2, 8, 12, drop=0.5).train()
    y = experts(torch.ones(6, 8), [4, 2])
    assert y.shape == (6, 8)
    experts.eval()
    torch.testing.assert_close(experts(torch.ones(6, 8), [4, 2]), experts._forward_loop(torch.ones(6, 8), [4, 2]))


def test_grouped_mm_path_equals_loop_in_bf16():
    # The GPU fast path (grouped_mm) also runs on CPU in bf16, so its arithmetic is checked here.
    experts = StackedExperts(4, 16, 32).to(torch.bfloat16)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    results = []
    for path in (experts._forward_grouped, experts._forward_loop):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        y = path(xi, counts)
        y.float().square().sum().backward()
        results.append((y.detach().float(), xi.grad.float(), [p.grad.float() for p in experts.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(gx1, gx2, **tol)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, **tol)
