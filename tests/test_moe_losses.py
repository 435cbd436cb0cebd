"""Auxiliary losses on hand-computed values: V-MoE, GShard/Switch, z-loss, DeepSeekMoE, DeepSeek-V3, Shazeer."""
import math

import pytest
import torch

from vmoe.moe.losses import (device_balance_loss, expert_balance_loss, gshard_loss, importance_loss, load_loss,
                             noisy_top_k_load_loss, sequence_balance_loss, z_loss)

PHI_1 = 0.8413447460685429  # standard normal CDF at 1


def test_importance_loss_hand_computed():
    # group 0: imp = [1.5, 0.5], mean 1, population std 0.5 -> 0.25; group 1: imp = [1, 1] -> 0
    gates = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    assert importance_loss(gates).item() == pytest.approx(0.125, rel=1e-5)
    assert importance_loss(gates[0]).item() == pytest.approx(0.25, rel=1e-5)


def test_load_loss_hand_computed():
    # k=1, sigma=1: threshold = top noisy logit = 1; P(e0) = 1 - Phi(0) = 0.5, P(e1) = 1 - Phi(1)
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([0.5, 1 - PHI_1])
    expected = (p.std(unbiased=False) / p.mean()).item() ** 2
    assert expected == pytest.approx(0.26858, abs=1e-4)
    assert load_loss(logits, logits.clone(), 1.0, 1).item() == pytest.approx(expected, rel=1e-5)


def test_load_loss_uses_kth_noisy_logit_and_sigma():
    logits = torch.zeros(1, 3)
    noisy = torch.tensor([[2.0, 1.0, 0.0]])
    # k=2 -> threshold 1; sigma=0.5 -> z = 2 for every expert -> equal loads -> 0
    assert load_loss(logits, noisy, 0.5, 2).item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.tensor([[1.0, 0.0, 0.0]])
    # z = (1 - [1, 0, 0]) / 0.5 = [0, 2, 2]; p = [0.5, 1 - Phi(2), 1 - Phi(2)]
    p2 = 1 - 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    p = torch.tensor([0.5, p2, p2], dtype=torch.float64)
    expected = (p.std(unbiased=False) / p.mean()).item() ** 2
    assert load_loss(logits, noisy, 0.5, 2).item() == pytest.approx(expected, rel=1e-5)


def test_load_loss_needs_noise():
    with pytest.raises(ValueError, match="noise_std must be > 0, got 0"):
        load_loss(torch.zeros(2, 2), torch.zeros(2, 2), 0.0, 1)


def test_gshard_loss_hand_computed():
    # argmax [0, 0, 1] -> frac [2/3, 1/3]; mean gates [0.5, 0.5]; 4 * mean([1/3, 1/6]) = 1
    gates = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    assert gshard_loss(gates).item() == pytest.approx(1.0, rel=1e-6)
    # perfectly balanced uniform gates also give 1 (its minimum for uniform gates)
    assert gshard_loss(torch.full((2, 4, 4), 0.25)).item() == pytest.approx(1.0, rel=1e-6)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    ln2 = math.log(2)
    assert z_loss(logits).item() == pytest.approx((ln2**2 + (1 + ln2) ** 2) / 2, rel=1e-6)


def test_load_loss_with_given_threshold_matches():
    logits = torch.randn(3, 10, 6)
    noisy = logits + 0.2 * torch.randn_like(logits)
    kth = torch.topk(noisy, 2, dim=-1).values[..., -1:]
    torch.testing.assert_close(load_loss(logits, noisy, 0.2, 2, threshold=kth), load_loss(logits, noisy, 0.2, 2))


def test_expert_balance_loss_hand_values():
    # Group A: S=2, E=3, K=2. counts [1, 2, 1] -> f = 3/(2*2) * counts = [.75, 1.5, .75];
    # P = mean over tokens = [.3, .45, .25]; sum f*P = .225 + .675 + .1875 = 1.0875.
    # Group B: uniform scores 1/3, choices [[0,1],[0,2]] -> f = [1.5, .75, .75]; sum f*P = 3 * (1/3) = 1.
    scores = torch.tensor([[[.5, .3, .2], [.1, .6, .3]], [[1 / 3] * 3] * 2])
    index = torch.tensor([[[0, 1], [1, 2]], [[0, 1], [0, 2]]])
    torch.testing.assert_close(expert_balance_loss(scores[0], index[0]), torch.tensor(1.0875))
    torch.testing.assert_close(expert_balance_loss(scores, index), torch.tensor((1.0875 + 1.0) / 2))


def test_expert_balance_loss_gradient_flows_through_scores_only():
    scores = torch.tensor([[.8, .2], [.6, .4]], requires_grad=True)
    # K=1, both tokens chose expert 0: f = 2/(1*2) * [2, 0] = [2, 0]; P = [.7, .3]; loss = 1.4.
    loss = expert_balance_loss(scores, torch.tensor([[0], [0]]))
    torch.testing.assert_close(loss, torch.tensor(1.4))
    loss.backward()
    # d loss / d s[t, i] = f_i / S = [1, 0] for each token.
    torch.testing.assert_close(scores.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_device_balance_loss_hand_values():
    # E=4 experts on D=2 devices {0,1}, {2,3}; S=2, K=1, both tokens chose expert 0.
    # f = 4/(1*2) * [2,0,0,0] = [4,0,0,0]; P = [.4, .25, .25, .1].
    # Device: f' = [mean(4,0), mean(0,0)] = [2, 0]; P' = [.65, .35] -> 2 * .65 = 1.3.
    # (The expert-level loss of the same routing is 4 * .4 = 1.6.)
    scores = torch.tensor([[.4, .3, .2, .1], [.4, .2, .3, .1]])
    index = torch.tensor([[0], [0]])
    torch.testing.assert_close(device_balance_loss(scores, index, 2), torch.tensor(1.3))
    torch.testing.assert_close(expert_balance_loss(scores, index), torch.tensor(1.6))
    # One expert per device: f' = f and P' = P, so it is the expert-level loss.
    torch.testing.assert_close(device_balance_loss(scores, index, 4), torch.tensor(1.6))
    with pytest.raises(ValueError, match="num_devices must be >= 1 and divide the number of routed experts 4, got 3"):
        device_balance_loss(scores, index, 3)


def test_sequence_balance_loss_hand_values():
    # Two sequences of T=2 tokens, E=2, K=1; sigmoid scores are normalised per token first.
    # seq 0: [[.9,.1],[.3,.3]] -> [[.9,.1],[.5,.5]], P = [.7,.3]; choices [0],[1] -> f = [1,1]; loss 1.0.
    # seq 1: [[.2,.6],[.4,.4]] -> [[.25,.75],[.5,.5]], P = [.375,.625]; choices [1],[1] -> f = [0,2]; 1.25.
    scores = torch.tensor([[[.9, .1], [.3, .3]], [[.2, .6], [.4, .4]]])
    index = torch.tensor([[[0], [1]], [[1], [1]]])
    torch.testing.assert_close(sequence_balance_loss(scores, index), torch.tensor(1.125))
    # The same 4 tokens as one sequence: P = [.5375,.4625], f = 2/4*[1,3] -> .26875 + .69375 = .9625.
    torch.testing.assert_close(sequence_balance_loss(scores.reshape(1, 4, 2), index.reshape(1, 4, 1)),
                               torch.tensor(0.9625))


def test_noisy_top_k_load_loss_kth_excluding():
    # One token, E=3, k=1, sigma=1, noisy = [2, 1, 0], clean = [1.5, 1, 0].
    # e0 is in the top-1, so the 1st largest of the others is 1 -> P0 = Phi(1.5 - 1) = Phi(.5) = .691462;
    # e1, e2 are not: threshold 2 -> P1 = Phi(-1) = .158655, P2 = Phi(-2) = .022750.
    # mean .290956, population var .083280 -> CV^2 = .983766.
    clean, noisy = torch.tensor([[1.5, 1.0, 0.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    torch.testing.assert_close(noisy_top_k_load_loss(clean, noisy, 1.0, 1), torch.tensor(0.983766), atol=1e-5,
                               rtol=1e-5)
    # A per-expert sigma of [.5, 1, 1] doubles e0's z: P0 = Phi(1) = .841345; loads [.841345, .158655, .02275]
    # mean .340917, var .128292 -> CV^2 = 1.103836.
    sigma = torch.tensor([[0.5, 1.0, 1.0]])
    torch.testing.assert_close(noisy_top_k_load_loss(clean, noisy, sigma, 1), torch.tensor(1.103836), atol=1e-5,
                               rtol=1e-5)
    # k = E: every expert is always chosen, loads are equal, CV^2 = 0.
    assert noisy_top_k_load_loss(clean, noisy, 1.0, 3).item() == 0
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=3\], got 4"):
        noisy_top_k_load_loss(clean, noisy, 1.0, 4)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="must share their leading dims"):
        expert_balance_loss(torch.rand(2, 3), torch.zeros(3, 1, dtype=torch.long))
