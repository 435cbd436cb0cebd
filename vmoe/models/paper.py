"""The V-MoE paper's architectures (Riquelme et al. 2021, Table 8 / the reference's configs) and E³, as
timm names, plus ``vmoe_reference`` for any architecture a converted reference checkpoint has.

The paper's ViT sizes are not timm's: V-MoE-S is 512 wide with 8 blocks (timm's ViT-S: 384 and 12).

| size | width D | blocks | heads | MLP H | patch |
|---|---|---|---|---|---|
| S/32 | 512 | 8 | 8 | 2048 | 32 |
| B/32, B/16 | 768 | 12 | 12 | 3072 | 32, 16 |
| L/16 | 1024 | 24 | 16 | 4096 | 16 |
| H/14 | 1280 | 32 | 16 | 5120 | 14 |

All use GELU with the tanh approximation, LayerNorm eps 1e-6, a class token, 224 px and 1000 classes
by default (override any of them, and ``representation_size`` for a pre-logits layer), and route with
the V-MoE router (K=2; E³: K=1). The routing group size is left to the caller (``group_size``): the
reference uses 8 images' tokens per group. ``pretrained=True`` with
``pretrained_cfg_overlay=dict(file="model.safetensors")`` loads weights written by ``vmoe convert``
(position embedding resampled to another ``img_size``, head reset for another ``num_classes``) or dense
ViT weights of the same shape, which are upcycled.
"""
from __future__ import annotations

import functools
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .build import convert_to_moe
from .finetune import finetune_state_dict
from .upcycle import upcycle_state_dict
from .vit_prelogits import PreLogitsViT

__all__ = ["PAPER_MODELS"]

_SIZES = {"s": (512, 8, 8), "b": (768, 12, 12), "l": (1024, 24, 16), "h": (1280, 32, 16)}
_MOE_ARGS = ("moe_layers", "num_experts", "k", "capacity_factor", "eval_capacity_factor", "batch_priority",
             "noise_std", "group_size", "router", "moe_kwargs")


def _vit(size: str, patch: int) -> dict[str, Any]:
    dim, depth, heads = _SIZES[size]
    return dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
                act_layer="gelu_tanh", qkv_bias=True, class_token=True, global_pool="token", fc_norm=False)


# name -> (ViT arguments, MoE defaults)
PAPER_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "vmoe_paper_s32_e8_last2": (_vit("s", 32), dict(moe_layers="last-2", num_experts=8, k=2)),
    "vmoe_paper_b32_e32_every2": (_vit("b", 32), dict(moe_layers="every-2", num_experts=32, k=2)),
    "vmoe_paper_b16_e8_every2": (_vit("b", 16), dict(moe_layers="every-2", num_experts=8, k=2)),
    "vmoe_paper_l16_e32_every2": (_vit("l", 16), dict(moe_layers="every-2", num_experts=32, k=2)),
    "vmoe_paper_h14_e32_every2": (_vit("h", 14), dict(moe_layers="every-2", num_experts=32, k=2)),
    "e3_paper_s32_e8_m2_last2": (_vit("s", 32), dict(moe_layers="last-2", num_experts=8, k=1, router="ensemble",
                                                     moe_kwargs={"ensemble_size": 2})),
    # Any architecture: every ViT and MoE argument given by the caller (what `vmoe convert` writes).
    "vmoe_reference": (dict(act_layer="gelu_tanh", fc_norm=False), dict(moe_layers="every-2", num_experts=8)),
}


def _cfg(description: str) -> dict[str, Any]:
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=1.0, interpolation="bilinear",
                fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="patch_embed.proj",
                classifier="head", license="apache-2.0", paper_ids="arXiv:2106.05974", description=description)


default_cfgs = generate_default_cfgs({name: _cfg(f"{name}: weights from a local file (vmoe convert)")
                                      for name in PAPER_MODELS})


def _build(moe: dict[str, Any], **vit_kwargs: Any) -> nn.Module:
    return convert_to_moe(PreLogitsViT(**vit_kwargs), **moe)


def _weights_filter(state_dict: dict, model: nn.Module) -> dict:
    """V-MoE weights: fine-tuning adaptation only; dense ViT weights: upcycled."""
    if any(".experts." in key for key in state_dict):
        return finetune_state_dict(state_dict, model)
    try:
        return upcycle_state_dict(state_dict, model)
    except TypeError as err:  # timm would retry a TypeError-raising filter with one argument
        raise RuntimeError(f"upcycling the pretrained weights failed: {err}") from err


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    vit_args, moe_defaults = PAPER_MODELS[variant]
    moe = {**moe_defaults, **{key: kwargs.pop(key) for key in _MOE_ARGS if key in kwargs}}
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(functools.partial(_build, moe), variant, pretrained,
                                pretrained_filter_fn=_weights_filter,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **{**vit_args, **kwargs})


def _entrypoint(name: str) -> None:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(name, pretrained, **kwargs)

    vit, moe = PAPER_MODELS[name]
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"{name}: ViT {vit} with MoE {moe}."
    globals()[name] = register_model(entry)


for _name in PAPER_MODELS:
    _entrypoint(_name)
