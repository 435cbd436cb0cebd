"""The original ViT's classifier in timm's VisionTransformer: an optional representation layer.

Big Vision / the JAX V-MoE put a ``pre_logits`` layer (Dense + tanh, width R) between the pooled features
and the head when ``representation_size`` is set; timm's VisionTransformer no longer has it. Registered
with timm as ``vmoe_vit_prelogits`` (:mod:`vmoe.models.timm_names`) so that create_vmoe / the CLI can use it
as a backbone.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["PreLogitsViT"]


class PreLogitsViT(VisionTransformer):
    """timm VisionTransformer + ``representation_size`` R (None: none, the plain timm model).

    With R: ``pre_logits.fc`` [R, D] and tanh after pooling (and fc_norm), then ``head`` [N, R].
    ``forward_head(x, pre_logits=True)`` returns the [B, R] representation (``head_hidden_size`` R;
    ``num_features`` stays D, the width of ``forward_features``, as timm defines it).
    """

    def __init__(self, *args: Any, representation_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if representation_size is not None and representation_size < 1:
            raise ValueError(f"representation_size must be a positive int or None, got {representation_size}")
        self.representation_size = representation_size
        if representation_size:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(self.embed_dim, representation_size),
                                                        act=nn.Tanh()))
            self.head_hidden_size = representation_size  # num_features stays D, forward_features' width (timm)
            self.head = nn.Linear(representation_size, self.num_classes) if self.num_classes > 0 else nn.Identity()
        else:
            self.pre_logits = nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.representation_size and num_classes > 0:
            ref = self.pre_logits.fc.weight
            self.head = nn.Linear(self.representation_size, num_classes, device=ref.device, dtype=ref.dtype)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: [B, T, D] features -> [B, N] logits (or [B, R or D] with pre_logits=True)."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.pre_logits(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)
