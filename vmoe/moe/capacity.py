"""How many slots each expert gets in one routing group (docs/design.md, "Capacity")."""
from __future__ import annotations

import math

__all__ = ["compute_capacity", "expert_choice_capacity", "CAPACITY_MULTIPLE"]

# Capacities are rounded up to a multiple of this, so buffer shapes vary less between group sizes.
CAPACITY_MULTIPLE = 4


def compute_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert for ``num_tokens`` assignments spread over ``num_experts`` experts.

    ``capacity = ceil(num_tokens * capacity_factor / num_experts)``, then rounded up to a multiple of
    ``CAPACITY_MULTIPLE`` (4). For top-k routing over a group of S tokens pass ``num_tokens = S * K``.

    Example: S=32, K=2, E=32, factor 1.0 -> ceil(2) = 2 -> 4.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    capacity = math.ceil(num_tokens * capacity_factor / num_experts)
    if capacity < 1:
        raise ValueError(f"capacity ceil({num_tokens} * {capacity_factor} / {num_experts}) = {capacity} < 1; "
                         "raise the capacity factor or the group size")
    return -(-capacity // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


def expert_choice_capacity(group_size: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes from a group of S = ``group_size`` when experts choose tokens (expert
    choice, Zhou et al. 2022; the factor is the average number of experts per token):
    ``C = min(S, ceil(S * capacity_factor / E))``, at least 1."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, min(group_size, math.ceil(group_size * capacity_factor / num_experts)))
