"""Hand-computed values for the DeepSeekMoE / DeepSeek-V3 / Shazeer losses."""
import pytest
import torch

from vmoe.moe.losses import device_balance_loss, expert_balance_loss, noisy_top_k_load_loss, sequence_balance_loss


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
