"""E³ models (efficient ensembles of experts, Allingham et al. 2022): a V-MoE whose batch is repeated
M times before the first MoE block, each copy routed among its own experts.

``model(x)`` returns the ensemble's prediction, the mean over members of the log-softmax [B, N];
``model.forward_members(x)`` the members' logits [B, M, N] (member m of image b is row b*M + m of the
reference's output). The classes keep timm's VisionTransformer API and state-dict keys: they only add
the repeat, so a V-MoE becomes an E³ model in place (``to_ensemble``) without touching its weights.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..moe import iter_moe_mlps
from ..moe.ensemble import EnsembleMoEMlp
from .vit_prelogits import PreLogitsViT

__all__ = ["EnsembleMixin", "EnsembleVisionTransformer", "EnsemblePreLogitsViT", "to_ensemble"]


class EnsembleMixin:
    """Adds the E³ batch repeat to a timm VisionTransformer subclass.

    ensemble_size: M; ensemble_start: index of the block before which the batch is repeated (the first
    MoE block: before it all members are identical, so repeating earlier would only cost compute).
    """

    ensemble_size: int = 1
    ensemble_start: int = 0

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: [B, C, H, W] -> features [B*M, T, D] (row b*M + m = image b, member m)."""
        if attn_mask is not None or is_causal:
            raise ValueError("E³ models take no attn_mask / is_causal")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        for i, block in enumerate(self.blocks):
            if i == self.ensemble_start:
                x = x.repeat_interleave(self.ensemble_size, dim=0)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_members(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> member logits [B, M, N]."""
        logits = self.forward_head(self.forward_features(x))
        return logits.unflatten(0, (-1, self.ensemble_size))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: [B, C, H, W] -> mean over members of log_softmax(logits), [B, N]."""
        if attn_mask is not None or is_causal:
            raise ValueError("E³ models take no attn_mask / is_causal")
        return self.forward_members(x).float().log_softmax(-1).mean(1)

    def extra_repr(self) -> str:
        return f"ensemble_size={self.ensemble_size}, ensemble_start={self.ensemble_start}"


class EnsembleVisionTransformer(EnsembleMixin, VisionTransformer):
    """E³ on timm's VisionTransformer."""


class EnsemblePreLogitsViT(EnsembleMixin, PreLogitsViT):
    """E³ on :class:`PreLogitsViT` (the reference's models, with an optional representation layer)."""


_ENSEMBLE_CLASS = {VisionTransformer: EnsembleVisionTransformer, PreLogitsViT: EnsemblePreLogitsViT}


def to_ensemble(model: nn.Module) -> nn.Module:
    """Make a V-MoE with :class:`EnsembleMoEMlp` blocks an E³ model, in place (same weights and keys).

    The ensemble size comes from the blocks (all must agree); the repeat goes before the first block
    with an MoE layer. A model without ensemble blocks is returned unchanged.
    """
    layers = [(name, layer) for name, layer in iter_moe_mlps(model)]
    ensemble = [(name, layer) for name, layer in layers if isinstance(layer, EnsembleMoEMlp)]
    if not ensemble:
        return model
    if len(ensemble) != len(layers):
        plain = [name for name, layer in layers if not isinstance(layer, EnsembleMoEMlp)]
        raise ValueError(f"an E³ model needs every MoE block to be an ensemble block; {plain} are not")
    sizes = {layer.ensemble_size for _, layer in ensemble}
    if len(sizes) != 1:
        raise ValueError(f"every E³ block must have the same ensemble_size, got {sorted(sizes)}")
    cls = _ENSEMBLE_CLASS.get(type(model))
    if cls is None and isinstance(model, EnsembleMixin):
        cls = type(model)
    if cls is None:
        raise ValueError(f"E³ needs a timm VisionTransformer or PreLogitsViT, got {type(model).__name__}")
    first = min(int(name.split(".")[1]) for name, _ in ensemble if name.startswith("blocks."))
    model.__class__ = cls
    model.ensemble_size, model.ensemble_start = sizes.pop(), first
    return model
