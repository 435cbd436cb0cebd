"""Choose and build the MoE block class for a routing scheme; the models call this, not MoEMlp directly."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .mlp_base import MoEMlpBase
from .ensemble import EnsembleMoEMlp
from .layer import MoEMlp
from .routers import ROUTERS
from .soft import SoftMoEMlp

__all__ = ["BLOCKS", "available_routers", "build_moe_mlp", "is_moe_mlp", "iter_moe_mlps"]

# Schemes whose block is not "router + sort-based dispatch" (MoEMlp); every other name is a router.
BLOCKS: dict[str, type[MoEMlpBase]] = {"soft": SoftMoEMlp, "ensemble": EnsembleMoEMlp}


def available_routers() -> list[str]:
    """Every valid ``router`` name: the registered routers plus the block-level schemes (soft)."""
    return sorted(set(ROUTERS) | set(BLOCKS))


def build_moe_mlp(*, router: str = "vmoe", **kwargs) -> MoEMlpBase:
    """An MoE block taking timm Mlp arguments (in_features, hidden_features, act_layer, bias, drop)
    plus the MoE settings of :class:`MoEMlp`. ``router="soft"`` builds a :class:`SoftMoEMlp`, any
    registered router name an :class:`MoEMlp` with that router."""
    if router in BLOCKS:
        return BLOCKS[router](router=router, **kwargs)
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; valid: {available_routers()}")
    return MoEMlp(router=router, **kwargs)


def is_moe_mlp(module: nn.Module) -> bool:
    """True for every MoE block: an instance of :class:`MoEMlpBase` (aux_loss, metrics, last_routing,
    num_experts, experts, routing settings)."""
    return isinstance(module, MoEMlpBase)


def iter_moe_mlps(model: nn.Module) -> Iterator[tuple[str, MoEMlpBase]]:
    """(qualified name, module) of every MoE block in ``model``, in registration order."""
    for name, module in model.named_modules():
        if is_moe_mlp(module):
            yield name, module
