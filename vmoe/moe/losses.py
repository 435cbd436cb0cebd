"""Auxiliary load-balancing losses (docs/design.md, "Auxiliary losses"). Pure functions of router tensors.

Every loss takes [..., S, E] tensors, computes its value per group (the leading dims) and returns the mean
over groups. std is the population std.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cv_squared", "importance_loss", "load_loss", "gshard_loss", "z_loss", "expert_balance_loss",
           "device_balance_loss", "sequence_balance_loss", "noisy_top_k_load_loss"]


def cv_squared(x: Tensor) -> Tensor:
    """(std / mean)^2 over the last dim, population std. x: [..., E] -> [...]."""
    mean = x.mean(-1)
    var = x.var(-1, unbiased=False)
    return var / (mean.square() + 1e-10)


def importance_loss(gates: Tensor) -> Tensor:
    """Shazeer 2017 / V-MoE importance loss: CV^2 of the per-expert gate sums. gates: [..., S, E]."""
    return cv_squared(gates.float().sum(-2)).mean()


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, k: int, *,
              threshold: Tensor | None = None) -> Tensor:
    """Shazeer 2017 / V-MoE load loss: CV^2 of each expert's expected load under the noise.

    logits, noisy_logits: [..., S, E]; noise_std: the sigma of the noise that was added; k: choices.
    P(token picks e) = 1 - Phi((thr - logit_e) / sigma), thr = the token's k-th largest noisy logit.
    threshold: that k-th largest noisy logit [..., S, 1] when the caller has it already (saves a top-k).
    """
    if noise_std <= 0:
        raise ValueError(f"load_loss needs noise: noise_std must be > 0, got {noise_std}")
    logits, noisy_logits = logits.float(), noisy_logits.float()
    if threshold is None:
        threshold = torch.topk(noisy_logits, k, dim=-1).values[..., -1:]  # [..., S, 1]
    z = (threshold - logits) / noise_std
    prob = 1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return cv_squared(prob.mean(-2)).mean()


def gshard_loss(gates: Tensor) -> Tensor:
    """GShard / Switch balance loss: E^2 * mean_e(frac_top1[e] * mean_gate[e]). gates: [..., S, E]."""
    gates = gates.float()
    num_experts = gates.shape[-1]
    top1 = torch.nn.functional.one_hot(gates.argmax(-1), num_experts).to(gates.dtype)
    frac = top1.mean(-2)  # [..., E]
    mean_gate = gates.mean(-2)
    return (num_experts**2 * (frac * mean_gate).mean(-1)).mean()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [..., S, E]."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _choice_fraction(expert_index: Tensor, num_experts: int) -> Tensor:
    """f_i = E / (K * S) * (number of the S tokens' K choices that went to expert i). [..., S, K] -> [..., E].

    With perfectly even choices every f_i is 1.
    """
    s, k = expert_index.shape[-2:]
    flat = expert_index.reshape(*expert_index.shape[:-2], s * k)
    counts = torch.zeros(*flat.shape[:-1], num_experts, device=flat.device).scatter_add_(
        -1, flat, torch.ones(flat.shape, device=flat.device))
    return counts * (num_experts / (k * s))


def _check_pair(scores: Tensor, expert_index: Tensor) -> None:
    if scores.dim() < 2 or scores.shape[:-1] != expert_index.shape[:-1]:
        raise ValueError("scores [..., S, E] and expert_index [..., S, K] must share their leading dims; got "
                         f"{tuple(scores.shape)} and {tuple(expert_index.shape)}")


def expert_balance_loss(scores: Tensor, expert_index: Tensor) -> Tensor:
    """DeepSeekMoE expert-level balance loss: sum_i f_i * P_i, averaged over groups.

    scores: [..., S, E'] affinities of the routed experts; expert_index: [..., S, K'] the chosen experts
    (before capacity). f_i = E'/(K' S) * count_i, P_i = mean over the S tokens of scores[:, i].
    Equals 1 for uniform scores and even choices; the gradient flows through P only.
    """
    _check_pair(scores, expert_index)
    scores = scores.float()
    f = _choice_fraction(expert_index, scores.shape[-1])
    return (f * scores.mean(-2)).sum(-1).mean()


def device_balance_loss(scores: Tensor, expert_index: Tensor, num_devices: int) -> Tensor:
    """DeepSeekMoE device-level balance loss: the E' experts are split into ``num_devices`` contiguous
    groups; sum_d f'_d * P'_d with f'_d = mean of f_i over group d, P'_d = sum of P_i over group d.

    scores: [..., S, E']; expert_index: [..., S, K']; num_devices must divide E'.
    """
    _check_pair(scores, expert_index)
    e = scores.shape[-1]
    if num_devices < 1 or e % num_devices:
        raise ValueError(f"num_devices must be >= 1 and divide the number of routed experts {e}, "
                         f"got {num_devices}")
    scores = scores.float()
    f = _choice_fraction(expert_index, e).unflatten(-1, (num_devices, e // num_devices)).mean(-1)
    p = scores.mean(-2).unflatten(-1, (num_devices, e // num_devices)).sum(-1)
    return (f * p).sum(-1).mean()


def sequence_balance_loss(scores: Tensor, expert_index: Tensor) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    scores: [..., T, E] affinities (sigmoid, unbiased) of the T tokens of each sequence (one image here);
    expert_index: [..., T, K] the chosen experts. Each token's scores are first normalised to sum to 1,
    then it is :func:`expert_balance_loss` with the sequence as the group.
    """
    _check_pair(scores, expert_index)
    scores = scores.float()
    return expert_balance_loss(scores / scores.sum(-1, keepdim=True).clamp_min(1e-20), expert_index)


def noisy_top_k_load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: Tensor | float, k: int) -> Tensor:
    """Shazeer et al. 2017 load loss with a per-token, per-expert noise scale (their eq. 8-10).

    logits, noisy_logits: [..., S, E]; noise_std: sigma, a tensor broadcastable to [..., S, E] (the learned
    softplus(x W_noise)) or a float. P(x, i) = Phi((logit_i - kth_excluding(noisy, k, i)) / sigma_i), where
    kth_excluding is the k-th largest noisy logit among the other experts; load_i = sum over tokens of P;
    loss = CV^2(load), averaged over groups. With k = E every expert is always chosen and the loss is 0.
    """
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    logits, noisy_logits = logits.float(), noisy_logits.float()
    if k == num_experts:  # every expert is always chosen: P = 1 everywhere, perfectly balanced
        return logits.new_zeros(())
    top = torch.topk(noisy_logits, k + 1, dim=-1).values  # [..., S, k+1]
    kth, next_after = top[..., k - 1: k], top[..., k: k + 1]
    # For an expert inside the top-k, the k-th largest of the others is the (k+1)-th overall.
    threshold = torch.where(noisy_logits >= kth, next_after, kth)
    z = (logits - threshold) / noise_std
    prob = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return cv_squared(prob.sum(-2)).mean()
