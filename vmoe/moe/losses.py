"""Auxiliary load-balancing losses (SPEC 5). Pure functions of router tensors.

Every loss takes [..., S, E] tensors, computes its value per group (the leading dims) and returns the mean
over groups. std is the population std.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cv_squared", "importance_loss", "load_loss", "gshard_loss", "z_loss"]


def cv_squared(x: Tensor) -> Tensor:
    """(std / mean)^2 over the last dim, population std. x: [..., E] -> [...]."""
    mean = x.mean(-1)
    var = x.var(-1, unbiased=False)
    return var / (mean.square() + 1e-10)


def importance_loss(gates: Tensor) -> Tensor:
    """Shazeer 2017 / V-MoE importance loss: CV^2 of the per-expert gate sums. gates: [..., S, E]."""
    return cv_squared(gates.float().sum(-2)).mean()


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, k: int) -> Tensor:
    """Shazeer 2017 / V-MoE load loss: CV^2 of each expert's expected load under the noise.

    logits, noisy_logits: [..., S, E]; noise_std: the sigma of the noise that was added; k: choices.
    P(token picks e) = 1 - Phi((thr - logit_e) / sigma), thr = the token's k-th largest noisy logit.
    """
    if noise_std <= 0:
        raise ValueError(f"load_loss needs noise: noise_std must be > 0, got {noise_std}")
    logits, noisy_logits = logits.float(), noisy_logits.float()
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
