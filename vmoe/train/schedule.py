"""Per-step learning-rate schedule: linear warmup, then cosine or linear decay."""
from __future__ import annotations

import math

__all__ = ["warmup_decay_factor", "DECAYS"]

DECAYS = ("cosine", "linear", "constant")


def warmup_decay_factor(step: int, *, warmup_steps: int, total_steps: int, decay: str = "cosine",
                        min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first step already learns.
    Then, with progress p = (step - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1]:
    cosine  r + (1 - r) * (1 + cos(pi p)) / 2;  linear  r + (1 - r) * (1 - p);  constant 1,  r = min_lr_ratio.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
