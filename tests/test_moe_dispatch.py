"""Dispatch strategies: static-capacity addresses by hand, every strategy equal to the reference loop,
which kernels run under bf16-mixed, routing metrics without bincount, empty batches, expert parallel hook."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from vmoe.moe import MoEMlp, Routing, StackedExperts, routing_metrics, static_slots
from vmoe.moe import experts as experts_module
from vmoe.moe.dispatch import DispatchPrecision, SortedDispatch
from vmoe.moe.dispatch_choice import AutoDispatch, build_dispatch
from vmoe.moe.static_dispatch import StaticCapacityDispatch, static_combine

# The worked example of docs/design.md ("Slot assignment"), position order: S=3, E=3, K=2, C=2.
SPEC_ROUTING = Routing(expert_index=torch.tensor([[[0, 2], [0, 2], [2, 0]]]),
                       slot_index=torch.tensor([[[0, 1], [1, -1], [0, -1]]]),
                       combine_weights=torch.tensor([[[0.4, 0.2], [0.5, 0.0], [0.6, 0.0]]]))


def test_static_slots_by_hand():
    slots = static_slots(SPEC_ROUTING, num_experts=3, capacity=2)
    # row = (expert * G + group) * C + slot; dropped assignments read row 0 (weight 0).
    assert slots.dest.tolist() == [0, 5, 1, 0, 4, 0]
    # rows 0..5 = e0 s0, e0 s1, e1 s0, e1 s1, e2 s0, e2 s1; 3 = the zero row (N = 3 tokens).
    assert slots.source.tolist() == [0, 1, 3, 3, 2, 0]


def test_static_slots_fold_groups_into_each_expert_block():
    # G=2 groups of S=1 token, K=1, E=2, C=1: group g of expert e lives at row e*G + g.
    routing = Routing(torch.tensor([[[1]], [[1]]]), torch.tensor([[[0]], [[0]]]), torch.ones(2, 1, 1))
    slots = static_slots(routing, num_experts=2, capacity=1)
    assert slots.dest.tolist() == [2, 3] and slots.source.tolist() == [2, 2, 0, 1]


def test_static_combine_by_hand_and_gradients_equal_reference():
    experts = StackedExperts(3, 8, 12)
    x = torch.randn(3, 8, requires_grad=True)
    out = static_combine(x, SPEC_ROUTING, experts, capacity=2)
    x0, x1, x2 = x.detach()[0:1], x.detach()[1:2], x.detach()[2:3]
    with torch.no_grad():
        expected = torch.cat([0.4 * experts.forward_expert(0, x0) + 0.2 * experts.forward_expert(2, x0),
                              0.5 * experts.forward_expert(0, x1), 0.6 * experts.forward_expert(2, x2)])
    torch.testing.assert_close(out.detach(), expected)
    out.square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in experts.parameters())]
    assert torch.all(experts.fc1_weight.grad[1] == 0)  # expert 1 got no token: its slots are zeros
    x.grad = None
    experts.zero_grad()
    build_dispatch("reference")(x, SPEC_ROUTING, experts, 2).square().sum().backward()
    for got, want in zip(grads, [x.grad, *(p.grad for p in experts.parameters())]):
        torch.testing.assert_close(got, want)


def run(layer, x, dispatch):
    layer.dispatch = dispatch
    layer.zero_grad()
    xi = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y = layer(xi)
    (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("group_size", [None, 12])
@pytest.mark.parametrize("kwargs", [{}, {"num_shared_experts": 1, "expert_granularity": 2}])
def test_every_strategy_equals_reference(group_size, kwargs):
    layer = MoEMlp(16, 32, num_experts=4, k=2, capacity_factor=0.5, group_size=group_size, **kwargs).train()
    x = torch.randn(4, 6, 16)
    ref = run(layer, x, "reference")
    assert float(layer.metrics["dropped_fraction"]) > 0
    for name in ("sorted", "static", "auto"):
        y, gx, g = run(layer, x, name)
        torch.testing.assert_close(y, ref[0], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(gx, ref[1], atol=1e-5, rtol=1e-5, msg=name)
        for key in g:
            torch.testing.assert_close(g[key], ref[2][key], atol=1e-5, rtol=1e-5, msg=f"{name} {key}")


def test_dispatch_is_chosen_once():
    layer = MoEMlp(16, 32, num_experts=4)
    assert isinstance(layer.dispatch, AutoDispatch)
    cpu, meta = torch.empty(0), torch.empty(0, device="meta")
    assert isinstance(layer.dispatch.resolve(cpu), SortedDispatch)  # CPU eager: sorted (bench_moe.py)
    assert isinstance(layer.dispatch.resolve(meta), StaticCapacityDispatch)  # any accelerator: static
    layer.dispatch = "reference"
    assert layer.dispatch.name == "reference" and not hasattr(layer, "use_reference")
    layer.dispatch = "static"
    assert isinstance(layer.dispatch, StaticCapacityDispatch)
    assert MoEMlp(16, 32, dispatch="sorted").dispatch.name == "sorted"
    with pytest.raises(ValueError, match=r"unknown dispatch 'fast'; valid: \['auto', 'reference', 'sorted', 'static'\]"):
        MoEMlp(16, 32, dispatch="fast")


class _Spy:
    """Records the dtypes a kernel is called with, then runs it."""

    def __init__(self, fn):
        self.fn, self.dtypes = fn, []

    def __call__(self, *args, **kwargs):
        self.dtypes.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return self.fn(*args, **kwargs)


def _bf16_mixed_forward(layer, x):
    with MixedPrecision("bf16-mixed", "cpu").forward_context():
        return layer(x)


def test_bf16_mixed_sorted_path_takes_grouped_mm(monkeypatch):
    # On CUDA (SM >= 80) grouped_mm_helps is true for bf16; forced here so the CPU runs the same decision:
    # it must look at the autocast dtype, not at the float32 activations LayerNorm hands over.
    monkeypatch.setattr(experts_module, "grouped_mm_helps", lambda device, dtype: dtype == torch.bfloat16)
    spy = _Spy(F.grouped_mm)
    monkeypatch.setattr(F, "grouped_mm", spy)
    layer = MoEMlp(16, 32, num_experts=4, k=2, dispatch="sorted").eval()
    x = torch.randn(2, 6, 16)  # float32, as under autocast after a LayerNorm
    assert layer.experts.sorted_path(x) == "blocks"
    with MixedPrecision("bf16-mixed", "cpu").forward_context():
        assert layer.experts.sorted_path(x) == "grouped"
    y = _bf16_mixed_forward(layer, x)
    assert spy.dtypes and all(d == (torch.bfloat16, torch.bfloat16) for d in spy.dtypes)
    assert layer.last_routing.combine_weights.dtype == torch.float32  # the router stays float32
    layer.dispatch = "reference"
    torch.testing.assert_close(y.float(), layer(x), atol=3e-2, rtol=3e-2)


def test_bf16_mixed_static_path_runs_experts_in_bf16(monkeypatch):
    spy = _Spy(torch.baddbmm)
    monkeypatch.setattr(torch, "baddbmm", spy)
    layer = MoEMlp(16, 32, num_experts=4, k=2, dispatch="static").eval()
    x = torch.randn(2, 6, 16)
    y = _bf16_mixed_forward(layer, x)
    assert y.dtype == torch.bfloat16 and len(spy.dtypes) == 2
    assert all(set(d) == {torch.bfloat16} for d in spy.dtypes)
    assert layer.last_routing.combine_weights.dtype == torch.float32
    layer.dispatch = "reference"
    torch.testing.assert_close(y.float(), layer(x), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dispatch", ["sorted", "static", "reference"])
def test_round_to_bf16_policy(dispatch):
    layer = MoEMlp(16, 32, num_experts=4, k=2).eval()
    layer.dispatch = build_dispatch(dispatch, DispatchPrecision(round_to=torch.bfloat16))
    x = torch.randn(2, 6, 16)
    y = layer(x)
    assert y.dtype == torch.float32  # experts in float32 on rounded inputs, combine in float32
    # The same as rounding by hand around float32 experts.
    layer.dispatch = "reference"
    exact = layer(x.bfloat16().float())
    assert (y - exact).abs().max() < 2e-2 and not torch.equal(y, exact)
    layer.dispatch = build_dispatch(dispatch, DispatchPrecision(round_to=torch.bfloat16))
    assert layer.dispatch.precision.round_to == torch.bfloat16
    layer.dispatch = "static"  # switching by name keeps the precision policy
    assert layer.dispatch.precision.round_to == torch.bfloat16


def test_routing_metrics_by_hand_without_bincount(monkeypatch):
    monkeypatch.setattr(torch, "bincount", None)  # would raise if used
    m = routing_metrics(SPEC_ROUTING, num_experts=3)
    assert m["tokens_per_expert"].tolist() == [2.0, 0.0, 2.0]
    assert m["dropped_fraction"].item() == pytest.approx(2 / 6)
    assert m["dropped_tokens_fraction"].item() == 0.0
    requested = torch.tensor([3.0, 0.0, 3.0])
    assert m["load_cv"].item() == pytest.approx((requested.std(unbiased=False) / requested.mean()).item())


@pytest.mark.parametrize("shape", [(0, 5, 16), (3, 0, 16)])
@pytest.mark.parametrize("dispatch", ["auto", "static"])
def test_empty_batch_like_timm_mlp(shape, dispatch):
    layer = MoEMlp(16, 32, out_features=8, num_experts=4, group_size=5, dispatch=dispatch)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:2], 8)
    y.sum().backward()
    assert x.grad.shape == shape and torch.all(layer.experts.fc1_weight.grad == 0)
    assert layer.metrics["tokens_per_expert"].tolist() == [0.0] * 4
    assert layer.last_routing.expert_index.shape == (*shape[:2], 2) and layer.aux_loss.item() == 0


def test_expert_parallel_is_a_dispatch_strategy():
    from vmoe.distributed import ExpertParallel, ExpertParallelDispatch, ExpertParallelGroups

    layer = MoEMlp(16, 32, num_experts=4, k=2, dispatch="static").eval()
    assert layer.expert_parallel is None
    groups = ExpertParallelGroups(ep_group=None, ep_rank=0, ep_size=1, replica_group=None, num_replicas=1,
                                  dp_size=1, global_rank=0)
    hook = ExpertParallel(groups, 4)
    layer.dispatch = ExpertParallelDispatch(hook, layer.dispatch)
    assert layer.expert_parallel is hook
    x = torch.randn(2, 6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    layer.dispatch = layer.dispatch.local
    assert layer.dispatch.name == "static"
    torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize("router", ["deepseek", "deepseek_v3", "dense", "expert_choice", "gshard", "mixtral",
                                    "shazeer", "switch", "vmoe"])
def test_static_dispatch_fits_every_router(router):
    # Every router keeps its slots below the block's capacity(S), the size of the static buffers.
    layer = MoEMlp(16, 32, num_experts=4, router=router).eval()
    x = torch.randn(2, 6, 16)
    layer.dispatch = "reference"
    ref = layer(x)
    layer.dispatch = "static"
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["sorted", "static", "reference"])
def test_bfloat16_dispatch_keyword_is_the_round_to_policy_of_every_strategy(dispatch):
    layer = MoEMlp(16, 32, num_experts=4, k=2, bfloat16_dispatch=True, dispatch=dispatch).eval()
    assert layer.settings.bfloat16_dispatch and layer.dispatch.name == dispatch
    assert layer.dispatch.precision.round_to == torch.bfloat16
    x = torch.randn(2, 6, 16)
    y = layer(x)
    layer.dispatch = "reference"  # by name: the policy is kept
    torch.testing.assert_close(y, layer(x), atol=1e-6, rtol=1e-6)
    layer.settings = layer.settings.replace(bfloat16_dispatch=False)
    assert layer.dispatch.name == "reference" and layer.dispatch.precision.round_to is None
    assert not torch.allclose(layer(x), y, atol=1e-5)
