import math

import pytest
import torch

from vmoe.moe.losses import gshard_loss, importance_loss, load_loss, z_loss

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
