"""V-MoE's ``dispatcher.bfloat16``: the tokens sent to the experts and the expert outputs travel in bfloat16.

The reference dispatches with a bfloat16 einsum (so expert inputs are rounded to bfloat16), runs the
experts on them in float32 and combines bfloat16 expert outputs with float32 combine weights. Rounding
both sides, in that order, is what reproduces its numbers; either one alone misses by about 3e-3.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["bfloat16_rounded", "round_to_bfloat16"]


def round_to_bfloat16(x: Tensor) -> Tensor:
    """x rounded to the nearest bfloat16 (ties to even), returned in x's dtype; differentiable (identity
    gradient through the cast pair, as autograd defines it)."""
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16).to(x.dtype)


def bfloat16_rounded(experts: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap an expert callable taking the token rows first (``experts(x [A, D], ...)`` of the fast path
    or ``expert_fn(e, x [n, D])`` of the reference loop) so its input and output are rounded to bf16."""

    def wrapped(*args):
        if args and isinstance(args[0], Tensor):  # experts(x, counts)
            return round_to_bfloat16(experts(round_to_bfloat16(args[0]), *args[1:]))
        e, x = args  # expert_fn(e, x)
        return round_to_bfloat16(experts(e, round_to_bfloat16(x)))

    return wrapped
