"""Start a V-MoE from V-MoE weights trained at another image size or class count (fine-tuning).

As the reference's fine-tuning configs do with the released checkpoints: the position embedding is
resampled to the new grid (bicubic, class token kept as is) and a classifier of another size is left
at the model's fresh initialisation. Every other tensor must fit exactly; load_weights checks that.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv
from torch import Tensor, nn

__all__ = ["finetune_state_dict"]

_log = logging.getLogger(__name__)


def _grid(tokens: int, prefix: int, what: str) -> tuple[int, int]:
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        raise ValueError(f"{what} has {tokens} positions ({prefix} prefix tokens): not a square grid")
    return side, side


def finetune_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state`` adapted to ``model``: pos_embed [1, T, D] resampled to the model's T; the patch embedding
    adapted to another number of input channels (timm's adapt_input_conv); ``head.*`` (or the classifier
    the model's pretrained_cfg names) of another shape replaced by the model's fresh one."""
    out = dict(state)
    own = model.state_dict()
    if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
        old, new = out["pos_embed"], own["pos_embed"]
        if old.shape[-1] != new.shape[-1]:
            raise ValueError(f"pos_embed width differs: checkpoint {tuple(old.shape)} vs model {tuple(new.shape)}")
        out["pos_embed"] = resample_abs_pos_embed(old, new_size=_grid(new.shape[1], prefix, "the model"),
                                                  old_size=_grid(old.shape[1], prefix, "the checkpoint"),
                                                  num_prefix_tokens=prefix, verbose=False)
        _log.info("fine-tuning: pos_embed resampled from %s to %s", tuple(old.shape), tuple(new.shape))
    key = "patch_embed.proj.weight"
    if key in out and key in own and out[key].shape != own[key].shape:
        old, new = out[key], own[key]
        if old.shape[0] == new.shape[0] and old.shape[2:] == new.shape[2:]:  # only in_chans differs
            out[key] = adapt_input_conv(new.shape[1], old, base_chans=old.shape[1])
            _log.info("fine-tuning: %s adapted from %d to %d input channels", key, old.shape[1], new.shape[1])
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    for name in (classifier,) if isinstance(classifier, str) else tuple(classifier):
        keys = [f"{name}.weight", f"{name}.bias"]
        if any(k in out and k in own and out[k].shape != own[k].shape for k in keys):
            for key in keys:
                if key in own:
                    out[key] = own[key]
            _log.info("fine-tuning: %s reset to the model's %s classes", name, own[keys[0]].shape[0])
    return out
