"""How many slots each expert gets in one routing group (docs/design.md, "Capacity")."""
from __future__ import annotations

import math

__all__ = ["compute_capacity"]


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    *,
    ceil_or_round: str = "ceil",
    multiple_of: int | None = 4,
) -> int:
    """Slots per expert for ``num_tokens`` assignments spread over ``num_experts`` experts.

    ``capacity = ceil(num_tokens * capacity_factor / num_experts)`` (or ``round``), then rounded up to a
    multiple of ``multiple_of`` (skipped when it is None or 0). For top-k routing over a group of S tokens
    pass ``num_tokens = S * K``.

    Example: S=32, K=2, E=32, factor 1.0 -> ceil(2) = 2 -> 4.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    raw = num_tokens * capacity_factor / num_experts
    if ceil_or_round == "ceil":
        capacity = math.ceil(raw)
    elif ceil_or_round == "round":
        capacity = round(raw)
    else:
        raise ValueError(f"ceil_or_round must be 'ceil' or 'round', got {ceil_or_round!r}")
    if capacity < 1:
        raise ValueError(
            f"capacity {ceil_or_round}({num_tokens} * {capacity_factor} / {num_experts}) = {capacity} < 1; "
            "raise the capacity factor or the group size"
        )
    if multiple_of:
        capacity = -(-capacity // multiple_of) * multiple_of
    return capacity
