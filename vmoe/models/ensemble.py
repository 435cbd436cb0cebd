"""E³ models (efficient ensembles of experts, Allingham et al. 2022): a V-MoE whose batch is repeated
M times before the first MoE block, each copy routed among its own experts.

``model(x)`` returns the ensemble's prediction as the reference evaluates it, log(mean over members of
softmax(member logits)) [B, N] (log-probabilities: ``.exp()`` gives the ensemble's class probabilities);
``model.forward_members(x)`` the members' logits [B, M, N] (member m of image b is row b*M + m of the
reference's output). The classes keep timm's VisionTransformer API and state-dict keys: they only add
the repeat, so a V-MoE becomes an E³ model in place (``to_ensemble``) without touching its weights.

timm's API with the image batch axis B: ``forward_features`` gives the member rows [B*M, T, D] that
``forward_head`` consumes; ``forward_head(f)`` the ensemble [B, N], ``forward_head(f, pre_logits=True)`` and
a head-less model (num_classes=0) the members' mean representation [B, R or D]; ``forward_intermediates``
and ``features_only`` the members' mean of each block's output, [B, D, H', W'].
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from timm.layers import register_notrace_function
from timm.models._features import feature_take_indices  # timm's own models import it from here
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..moe import iter_moe_mlps
from ..moe.ensemble import EnsembleMoEMlp
from .vit_prelogits import PreLogitsViT

__all__ = ["EnsembleMixin", "EnsembleVisionTransformer", "EnsemblePreLogitsViT", "to_ensemble", "ensemble_log_probs",
           "reject_attention_mask"]


def reject_attention_mask(x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """x unchanged; raises when a mask or causal attention is asked of an E³ model (the member repeat would
    need the mask repeated too). A leaf under torch.fx (``torch.fx.wrap`` and timm's notrace functions), so a
    traced graph keeps the check instead of tracing a Python branch on its inputs."""
    if attn_mask is not None or is_causal:
        raise ValueError("E³ models take no attn_mask / is_causal (got attn_mask="
                         f"{None if attn_mask is None else tuple(attn_mask.shape)}, is_causal={is_causal})")
    return x


torch.fx.wrap("reject_attention_mask")
register_notrace_function(reject_attention_mask)


def ensemble_log_probs(member_logits: Tensor) -> Tensor:
    """member_logits [B, M, N] -> log(mean over the M members of softmax) [B, N], in float32.

    The reference's ensemble (``_ensemble_log_mean`` of its ``vmoe/evaluate/ensemble.py``: logsumexp of
    the members' log-softmax minus log M); its argmax is the reference's ensemble prediction and its
    negative log-likelihood the reference's ensemble cross-entropy.
    """
    log_p = member_logits.float().log_softmax(-1)
    return log_p.logsumexp(1) - math.log(member_logits.shape[1])


class EnsembleMixin:
    """Adds the E³ batch repeat to a timm VisionTransformer subclass.

    ensemble_size: M; ensemble_start: index of the block before which the batch is repeated (the first
    MoE block: before it all members are identical, so repeating earlier would only cost compute).
    """

    ensemble_size: int = 1
    ensemble_start: int = 0

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: [B, C, H, W] -> features [B*M, T, D] (row b*M + m = image b, member m)."""
        x = self.patch_embed(reject_attention_mask(x, attn_mask, is_causal))
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

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False, attn_mask: Tensor | None = None,
                              is_causal: bool = False) -> Any:
        """timm's forward_intermediates with the E³ repeat: x [B, C, H, W] -> (features [B*M, T, D] as
        forward_features gives them, intermediates [B, D, H', W'] or [B, T', D]). A block after the repeat
        contributes its members' mean, so every intermediate has the image batch axis B."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self.patch_embed(reject_attention_mask(x, attn_mask, is_causal))
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        intermediates = []
        for i, block in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
            if i == self.ensemble_start:
                x = x.repeat_interleave(self.ensemble_size, dim=0)
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.unflatten(0, (batch, -1)).mean(1))  # [B, 1 or M, T, D] -> [B, T, D]
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens and prefix is not None and not output_dict:
            intermediates = list(zip(intermediates, prefix))
        if output_dict:
            out = {"image_intermediates": intermediates}
            if return_prefix_tokens and prefix is not None:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def forward_member_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: features [B*M, T, D] -> per-member logits [B, M, N] (or representations [B, M, R])."""
        return super().forward_head(x, pre_logits=pre_logits).unflatten(0, (-1, self.ensemble_size))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: features [B*M, T, D] -> the ensemble's log-probabilities [B, N] (see ensemble_log_probs); with
        pre_logits=True, or with no classifier (num_classes=0), the members' mean representation [B, R or D]."""
        if pre_logits or self.num_classes == 0:
            return self.forward_member_head(x, pre_logits=True).mean(1)
        return ensemble_log_probs(self.forward_member_head(x))

    def forward_members(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> member logits [B, M, N]."""
        return self.forward_member_head(self.forward_features(x))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: [B, C, H, W] -> log(mean over members of softmax(member logits)), [B, N]."""
        return self.forward_head(self.forward_features(x, attn_mask, is_causal))

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
