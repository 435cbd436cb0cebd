"""Choose and build the MoE block class for a routing scheme; the models call this, not MoEMlp directly."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .layer import MoEMlp

__all__ = ["build_moe_mlp", "is_moe_layer", "iter_moe_layers"]


def build_moe_mlp(*, router: str = "vmoe", **kwargs) -> nn.Module:
    """An MoE block taking timm Mlp arguments (in_features, hidden_features, act_layer, bias, drop)
    plus the MoE settings of :class:`MoEMlp`."""
    return MoEMlp(router=router, **kwargs)


def is_moe_layer(module: nn.Module) -> bool:
    """True for every MoE block class: they set ``is_moe_layer = True`` and expose aux_loss, metrics,
    last_routing, num_experts, capacity_factor, eval_capacity_factor and batch_priority."""
    return bool(getattr(module, "is_moe_layer", False))


def iter_moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every MoE block in ``model``, in registration order."""
    for name, module in model.named_modules():
        if is_moe_layer(module):
            yield name, module
