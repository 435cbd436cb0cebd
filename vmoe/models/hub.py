"""Share a V-MoE the timm way: ``save_pretrained`` and the generic ``vmoe`` timm name.

``save_pretrained(model, dir)`` writes ``config.json`` (timm's format: ``architecture``, ``model_args``,
``pretrained_cfg``) and ``model.safetensors``; after ``import vmoe``,
``timm.create_model("local-dir:" + dir, pretrained=True)`` rebuilds the same V-MoE (same MoE placement,
expert counts and routing settings) with its weights loaded as they are, and so does ``hf-hub:<id>`` once the
folder is uploaded (``timm.models.push_to_hf_hub`` or ``huggingface-cli upload``).

A V-MoE built from any timm ViT (``create_vmoe`` / ``convert_to_moe``) calls itself ``vmoe``: the generic name
below, whose ``model_args`` hold the dense ``backbone`` and the MoE settings. The ``vmoe_*`` names of the
registry keep their own names.
"""
from __future__ import annotations

import functools
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..io import atomic_path
from ..moe import MoEConfig, iter_moe_layers
from .build import convert_to_moe
from .naming import GENERIC_NAME, is_vmoe_architecture, record_moe_args
from .upcycle import upcycle_state_dict

__all__ = ["save_pretrained", "record_moe_args", "GENERIC_NAME"]

_UPCYCLE_ARGS = ("expert_noise", "router_init_std")

# No weights of its own: pretrained=True needs a file, a local dir or a hub id holding V-MoE or dense weights.
default_cfgs = generate_default_cfgs({GENERIC_NAME: dict(
    num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9, interpolation="bicubic",
    fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="patch_embed.proj",
    classifier="head", license="apache-2.0", paper_ids="arXiv:2106.05974",
    description="V-MoE on any timm ViT backbone (model_args: backbone + MoE settings)")})


def _upcycle_filter(state_dict: dict, model: nn.Module, upcycle_kwargs: dict[str, Any]) -> dict:
    """timm's pretrained filter: V-MoE weights (with expert tensors) load as they are, dense weights are
    upcycled into the V-MoE (every expert a copy of its block's MLP)."""
    if any(".experts." in key for key in state_dict):
        if upcycle_kwargs:
            raise ValueError(f"upcycle arguments {sorted(upcycle_kwargs)} given, but the pretrained weights are "
                             "already a V-MoE's (they hold expert tensors); nothing is upcycled")
        return state_dict
    try:
        return upcycle_state_dict(state_dict, model, **upcycle_kwargs)
    except TypeError as err:  # timm would retry a TypeError-raising filter with one argument
        raise RuntimeError(f"upcycling the pretrained weights failed: {err}") from err


def _build_vmoe(backbone: str, moe: MoEConfig, **vit_kwargs) -> nn.Module:
    return convert_to_moe(timm.create_model(backbone, pretrained=False, **vit_kwargs), moe)


@register_model
def vmoe(pretrained: bool = False, backbone: str = "vit_small_patch16_224", **kwargs) -> nn.Module:
    """A V-MoE on any timm ViT ``backbone``: ``kwargs`` are the backbone's (img_size, embed_dim, depth, ...),
    create_vmoe's MoE arguments (moe_layers, num_experts, k, ...) and expert_noise / router_init_std for
    upcycling dense pretrained weights. What ``save_pretrained`` names a create_vmoe model."""
    upcycle_kwargs = {key: kwargs.pop(key) for key in _UPCYCLE_ARGS if key in kwargs}
    moe, kwargs = MoEConfig.split(kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        functools.partial(_build_vmoe, backbone, moe), GENERIC_NAME, pretrained,
        pretrained_filter_fn=functools.partial(_upcycle_filter, upcycle_kwargs=upcycle_kwargs),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, model_args: dict[str, Any] | None = None,
                    data_config: dict[str, Any] | None = None, label_names: list[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``save_directory`` (created) for timm's loaders.

    ``model``: a timm model (dense ViT, ``create_vmoe`` / ``convert_to_moe`` V-MoE, or a ``vmoe_*`` name).
    ``model_args``: extra or replacement reconstruction arguments (JSON values). ``data_config``: the
    preprocessing the weights expect (mean, std, input_size, crop_pct, interpolation), stored in the
    pretrained_cfg so ``timm.data.resolve_data_config`` returns it. Both files are written to a temporary
    folder first and moved into place one by one, so a failure leaves no half-written file. Returns the folder.
    """
    from timm.models import save_for_hf

    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not cfg.get("architecture"):
        raise ValueError(f"save_pretrained needs a model built by timm (with a pretrained_cfg naming its "
                         f"architecture); got {type(model).__name__}")
    arch = cfg["architecture"]
    if any(True for _ in iter_moe_layers(model)) and not is_vmoe_architecture(arch):
        raise ValueError(f"the model has MoE layers but calls itself {arch!r} (a dense architecture): build it with "
                         "vmoe.models.create_vmoe / convert_to_moe / a vmoe_* name, or pass the architecture's "
                         "model_args yourself")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    model_config = {"label_names": list(label_names)} if label_names else None
    # timm writes both files into a private folder; each is then moved into place through the atomic-write helper
    tmp = out / f".save_pretrained.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_for_hf(model, str(tmp), model_config=model_config, model_args=model_args, safe_serialization=True,
                    data_config=data_config)
        for name in ("model.safetensors", "config.json"):  # config last: a loader never sees new config, old weights
            with atomic_path(out / name) as target:
                shutil.move(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
