"""The one decision "are these V-MoE or dense weights?", for every way a V-MoE starts from a file or a hub.

V-MoE weights (they hold expert tensors) are adapted for fine-tuning: the position embedding is resampled to
the model's image size and a head of another class count is reset (:func:`finetune_state_dict`). Dense ViT
weights are upcycled: every expert starts as a copy of its block's MLP (:func:`upcycle_state_dict`).
Upcycling arguments with V-MoE weights are an error (there is nothing to upcycle).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from .checkpoint import holds_experts
from .finetune import finetune_state_dict
from .upcycle_weights import upcycle_state_dict

__all__ = ["holds_experts", "starting_state_dict"]


def starting_state_dict(state: Mapping[str, Tensor], model: nn.Module, upcycle_kwargs: dict[str, Any] | None = None,
                        source: str = "the weights") -> dict[str, Tensor]:
    """The state dict that V-MoE ``model`` loads from ``state``: V-MoE weights adapted for fine-tuning, dense
    weights upcycled with ``upcycle_kwargs`` (expert_noise, router_init_std, generator). ``source`` names the
    weights in the error raised when upcycle_kwargs come with V-MoE weights."""
    if holds_experts(state):
        if upcycle_kwargs:
            raise ValueError(f"upcycle arguments {sorted(upcycle_kwargs)} given, but {source} are already a V-MoE's "
                             "(they hold expert tensors); nothing is upcycled")
        return finetune_state_dict(state, model)
    return upcycle_state_dict(state, model, **(upcycle_kwargs or {}))
