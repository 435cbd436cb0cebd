"""Mixup / CutMix with soft targets for ImageClassifier (timm's ``Mixup``), and a check that the data is
normalised the way pretrained weights expect."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..moe.checks import check_non_negative

__all__ = ["build_mixup", "mix_batch", "soft_target_cross_entropy", "warn_if_normalisation_differs"]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def build_mixup(num_classes: int, *, label_smoothing: float, mixup_alpha: float, cutmix_alpha: float,
                cutmix_minmax: tuple[float, float] | None, prob: float, switch_prob: float, mode: str) -> Any:
    """timm's Mixup for these settings, or None when both alphas are 0 (and no cutmix_minmax).

    Every setting is checked by its ImageClassifier name (NaN and inf refused: NaN passes every comparison, and
    timm would fail later without naming the setting)."""
    check_non_negative(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
    for name, value in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob)):
        if not _is_number(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    if mode not in ("batch", "pair", "elem"):
        raise ValueError(f"mixup_mode must be 'batch', 'pair' or 'elem', got {mode!r}")
    if cutmix_minmax is not None and (len(cutmix_minmax) != 2 or not all(_is_number(v) for v in cutmix_minmax)
                                      or not 0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1):
        raise ValueError(f"cutmix_minmax must be (min, max) with 0 < min < max <= 1, got {cutmix_minmax}")
    if mixup_alpha == 0 and cutmix_alpha == 0 and cutmix_minmax is None:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                 cutmix_minmax=tuple(cutmix_minmax) if cutmix_minmax is not None else None, prob=prob,
                 switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)


def mix_batch(mixup: Any, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(mixed images [B, C, H, W], soft targets [B, num_classes]); B must be even (images pair with the
    reversed batch)."""
    if x.shape[0] % 2:
        raise ValueError(f"Mixup/CutMix pairs each image with another of the batch: the batch size must be even, got "
                         f"{x.shape[0]} (set data.batch_size to an even number; the last short batch is dropped)")
    return mixup(x, y)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_c targets[b, c] * log_softmax(logits)[b, c]; logits/targets [B, num_classes]."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def warn_if_normalisation_differs(module: Any) -> None:
    """Warn when a module starting from pretrained weights trains on data normalised otherwise than those
    weights expect (e.g. ImageNet statistics fed to timm's augreg ViTs, which expect 0.5/0.5)."""
    hp = getattr(module, "hparams", {})
    if not hp.get("pretrained"):
        return
    datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    cfg = getattr(module.model, "pretrained_cfg", None) or {}
    if mean is None or std is None or "mean" not in cfg or "std" not in cfg:
        return

    def per_channel(values, n):
        values = [float(v) for v in values]
        return values if len(values) == n else [sum(values) / len(values)] * n

    n = len(mean)
    want_mean, want_std = per_channel(cfg["mean"], n), per_channel(cfg["std"], n)
    if any(abs(a - b) > 1e-3 for a, b in zip(list(mean) + list(std), want_mean + want_std)):
        rank_zero_warn(f"the pretrained weights expect mean={tuple(want_mean)} std={tuple(want_std)} but the data is "
                       f"normalised with mean={tuple(mean)} std={tuple(std)}; set the datamodule's mean/std (or "
                       "model: <the timm name>) to match")
