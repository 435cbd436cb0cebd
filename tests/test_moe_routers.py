"""Each token-choice / expert-choice / dense router on hand-computed values, and the argument checks."""
import math

import pytest
import torch

from routed import Routed
from vmoe.moe import MoEMlp, build_moe_mlp

def make(name, num_experts=4, **kw):
    """A router whose weight is the identity, so its logits are the input itself (D = E)."""
    routed = Routed(name, num_experts, **kw)
    with torch.no_grad():
        routed.router.weight.copy_(torch.eye(num_experts))
    return routed.eval()


def test_switch_top1_and_losses():
    # logits [[ln3, 0], [0, 0]] -> gates [[.75,.25],[.5,.5]]; both tokens' top-1 is e0.
    # f*P: frac = [1, 0], mean gate = [.625, .375] -> E^2 * mean_e(frac * gate) = 4 * .3125 = 1.25.
    # z: logsumexp = [ln 4, ln 2] -> mean(1.921812, .480453) = 1.201133.
    router = make("switch", num_experts=2, capacity_factor=4.0)
    out = router(torch.tensor([[[math.log(3), 0.0], [0.0, 0.0]]]))
    assert out.routing.expert_index.tolist() == [[[0], [0]]]
    torch.testing.assert_close(out.routing.combine_weights, torch.tensor([[[.75], [.5]]]))
    torch.testing.assert_close(out.metrics["balance_loss"], torch.tensor(1.25))
    torch.testing.assert_close(out.metrics["z_loss"], torch.tensor(1.201133))
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.01 * 1.25 + 1e-3 * 1.201133))


def test_switch_router_runs_in_float32_under_autocast():
    router = make("switch", num_experts=2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(torch.randn(1, 8, 2))
    assert out.routing.combine_weights.dtype == torch.float32


def test_gshard_normalised_top2_and_random_second_expert():
    # gates [.6, .2, .1, .1] -> g1, g2 normalised to .75, .25 -> second kept with probability 2 * .25 = .5.
    logits = torch.tensor([.6, .2, .1, .1]).log().expand(1, 4000, 4)
    router = make("gshard", capacity_factor=4.0)
    out = router(logits)  # eval: second always kept
    assert out.routing.kept.all()
    torch.testing.assert_close(out.routing.combine_weights[0, 0], torch.tensor([.75, .25]))
    router.train()
    out = router(logits)
    kept_second = out.routing.kept[..., 1].float().mean().item()
    assert abs(kept_second - 0.5) < 0.04
    assert out.routing.kept[..., 0].all()
    torch.testing.assert_close(out.metrics["second_expert_sampled"], torch.tensor(kept_second))


def test_mixtral_softmax_over_top_k_logits():
    # logits [2, 1, 0, -1], k=2 -> softmax([2, 1]) = [.731059, .268941]; no aux loss by default.
    out = make("mixtral", capacity_factor=4.0)(torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]))
    assert out.routing.expert_index.tolist() == [[[0, 1]]]
    torch.testing.assert_close(out.routing.combine_weights, torch.tensor([[[.731059, .268941]]]))
    assert out.aux_loss.item() == 0


def test_deepseek_raw_affinities_and_balance_loss():
    # softmax([ln .5, ln .3, ln .2]) = [.5, .3, .2]; K=2 keeps e0, e1 with raw weights (not renormalised).
    # One token: f = 3/(2*1) * [1, 1, 0] = [1.5, 1.5, 0]; P = [.5, .3, .2] -> 1.2.
    router = make("deepseek", num_experts=3, capacity_factor=4.0)
    out = router(torch.tensor([.5, .3, .2]).log().view(1, 1, 3))
    torch.testing.assert_close(out.routing.combine_weights, torch.tensor([[[.5, .3]]]))
    torch.testing.assert_close(out.metrics["expert_balance_loss"], torch.tensor(1.2))
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.012))
    # E=4 on 2 devices {0,1} {2,3}, K=1, two tokens with logits [2,0,0,0]: s = [.711235, .096255 x3].
    # f = 4/(1*2) * [2,0,0,0] = [4,0,0,0] -> expert loss 4 * .711235 = 2.844940;
    # f' = [2, 0], P' = [.807490, .192510] -> device loss 1.614980.
    router = make("deepseek", num_experts=4, k=1, device_balance_weight=0.05, num_devices=2)
    out = router(torch.tensor([[[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]]))
    torch.testing.assert_close(out.metrics["expert_balance_loss"], torch.tensor(2.844940))
    torch.testing.assert_close(out.metrics["device_balance_loss"], torch.tensor(1.614980))
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.01 * 2.844940 + 0.05 * 1.614980))


def test_shazeer_noise_is_learned_through_the_load_loss():
    router = Routed("shazeer", 4, dim=8, k=2).train()
    out = router(torch.randn(2, 16, 8))
    assert {"importance_loss", "load_loss"} <= set(out.metrics)
    out.aux_loss.backward()
    assert router.noise_weight.grad is not None and router.noise_weight.grad.abs().sum() > 0
    # Eval: clean logits, weights = softmax over the top-k, importance of the sparse gates.
    # logits [1, 0, 0, -1] (k=2, ties broken by index) -> softmax([1, 0]) = [.731059, .268941].
    out = make("shazeer")(torch.tensor([[[1.0, 0.0, 0.0, -1.0]]]))
    torch.testing.assert_close(out.routing.combine_weights, torch.tensor([[[.731059, .268941]]]))


def test_dense_uses_every_expert_with_softmax_gates():
    torch.manual_seed(0)
    layer = build_moe_mlp(router="dense", in_features=8, hidden_features=16, num_experts=3).eval()
    x = torch.randn(2, 5, 8)
    y = layer(x)
    assert layer.k == 3 and layer.metrics["dropped_fraction"] == 0
    gates = (x @ layer.router.weight.T).softmax(-1)
    expected = sum(gates[..., e: e + 1] * layer.experts.forward_expert(e, x) for e in range(3))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens, factor, expected", [(10, 2.0, 5), (10, 1.0, 3), (7, 0.5, 1), (8, 16.0, 8)])
def test_expert_choice_capacity(tokens, factor, expected):
    # C = min(S, ceil(S * c / E)) with E = 4: ceil(5) = 5, ceil(2.5) = 3, ceil(.875) = 1, min(8, 32) = 8.
    router = Routed("expert_choice", 4, dim=6, capacity_factor=factor).train()
    assert router.capacity(tokens) == expected
    out = router(torch.randn(3, tokens, 6))
    assert out.routing.kept.sum(1).eq(expected).all()  # every expert took exactly C tokens per group


def test_expert_choice_metrics_hand_example():
    # S=3, E=2; scores = softmax over experts: t0 [2, 2] -> [.5, .5]; t1 [0, 1] -> [.269, .731];
    # t2 [1, 0] -> [.731, .269].
    # C = ceil(3 * 1 / 2) = 2: e0 takes t2, t0; e1 takes t1, t0 -> experts per token [2, 1, 1].
    router = make("expert_choice", num_experts=2, capacity_factor=1.0)
    out = router(torch.tensor([[[2.0, 2.0], [0.0, 1.0], [1.0, 0.0]]]))
    assert out.routing.kept.sum(-1).tolist() == [[2, 1, 1]]
    assert out.metrics["experts_per_token_min"] == 1 and out.metrics["experts_per_token_max"] == 2
    assert out.metrics["tokens_processed_fraction"] == 1
    # Eval factor .5: C = ceil(.75) = 1: e0 -> t2, e1 -> t1; t0 is processed by no expert.
    router.settings = router.settings.replace(eval_capacity_factor=0.5)
    out = router(torch.tensor([[[2.0, 2.0], [0.0, 1.0], [1.0, 0.0]]]))
    torch.testing.assert_close(out.metrics["tokens_processed_fraction"], torch.tensor(2 / 3))
    assert out.metrics["experts_per_token_min"] == 0


@pytest.mark.parametrize("router, kwargs, message", [
    ("switch", {"noise_std": 0.5}, r"routing scheme 'switch' does not use \['noise_std'\]"),
    ("switch", {"k": 2}, r"switch routes every token to exactly one expert \(k=1\), got k=2"),
    ("gshard", {"k": 1}, r"gshard is top-2 routing \(k=2\), got k=1"),
    ("expert_choice", {"k": 2}, r"routing scheme 'expert_choice' does not use \['k'\]"),
    ("expert_choice", {"batch_priority": True}, r"routing scheme 'expert_choice' does not use \['batch_priority'\]"),
    ("dense", {"importance_weight": 0.01}, r"router 'dense' does not use \['importance_weight'\]"),
    ("mixtral", {"load_weight": 0.01}, r"router 'mixtral' does not use \['load_weight'\]"),
    ("deepseek", {"router_kwargs": {"num_devices": 2}}, "num_devices=2 is only used by the device-level"),
    ("deepseek", {"router_kwargs": {"device_balance_weight": 0.1}}, "needs num_devices >= 2"),
    ("deepseek_v3", {"router_kwargs": {"num_groups": 3}}, "num_groups must be >= 1 and divide"),
    ("deepseek_v3", {"router_kwargs": {"gamma": -1.0}}, r"gamma \(bias update speed\) must be >= 0"),
    ("vmoe", {"load_weight": 0.1, "router_kwargs": {"load_weight": 1}},
     r"\['load_weight'\] given both as MoEMlp arguments and in router_kwargs"),
    ("vmoe", {"router_kwargs": {"k": 1}}, r"router 'vmoe' does not use \['k'\]"),
    ("soft", {"capacity_factor": 1.0}, r"soft MoE does not use \['capacity_factor'\]"),
    ("soft", {"router_kwargs": {"slots": 2}}, r"soft MoE router_kwargs does not take \['slots'\]"),
    ("nope", {}, r"unknown router 'nope'; valid: \[.*'soft'"),
])
def test_unused_or_bad_settings_raise(router, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_moe_mlp(router=router, in_features=8, hidden_features=16, num_experts=4, **kwargs)


def test_vmoe_defaults_unchanged():
    layer = MoEMlp(8, 16, num_experts=4)
    r, s = layer.router, layer.settings
    assert (s.k, s.capacity_factor, s.noise_std, r.importance_weight, r.load_weight) == (2, 1.05, 1.0, .005, .005)
