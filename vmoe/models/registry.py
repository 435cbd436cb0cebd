"""timm registry names of V-MoEs shaped like timm's ViTs, for sparse upcycling (available after ``import vmoe``).

These are timm's ViT-Ti/S/B/L backbones (e.g. ViT-S = 384 wide, 12 blocks) with MoE blocks, named
``vmoe_timm_*``; the paper's own V-MoE architectures (e.g. V-MoE-S/32 = 512 wide, 8 blocks) are in
:mod:`vmoe.models.paper`.

``timm.create_model("vmoe_timm_s16_e8_every2", pretrained=False, img_size=32, num_classes=10)`` builds a
randomly initialised V-MoE; ``pretrained=True`` makes timm fetch the dense ViT weights named in the
pretrained_cfg (hub id, or ``pretrained_cfg_overlay=dict(file=...)`` for a local file) and upcycles them
while loading. Extra kwargs: any VisionTransformer kwarg, create_vmoe's MoE arguments (moe_layers,
num_experts, k, capacity_factor, ...), and expert_noise / router_init_std for upcycling.
"""
from __future__ import annotations

import functools
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..moe import MoEConfig
from .build import convert_to_moe
from .hub import _upcycle_filter as hub_upcycle_filter

__all__ = ["VMOE_MODELS", "UPCYCLE_FROM"]

_TAG = "augreg_in21k_ft_in1k"

# name -> (ViT architecture args, MoE defaults, timm dense weights it upcycles from); K=2 is the vmoe
# router's default, left unset so another router=... keeps its own.
VMOE_MODELS: dict[str, tuple[dict[str, int], dict[str, Any], str]] = {
    "vmoe_timm_ti16_e8_every2": (dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
                            dict(moe_layers="every-2", num_experts=8), f"vit_tiny_patch16_224.{_TAG}"),
    "vmoe_timm_s16_e8_every2": (dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
                           dict(moe_layers="every-2", num_experts=8), f"vit_small_patch16_224.{_TAG}"),
    "vmoe_timm_s32_e8_last2": (dict(patch_size=32, embed_dim=384, depth=12, num_heads=6),
                          dict(moe_layers="last-2", num_experts=8), f"vit_small_patch32_224.{_TAG}"),
    "vmoe_timm_b16_e8_every2": (dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
                           dict(moe_layers="every-2", num_experts=8), f"vit_base_patch16_224.{_TAG}"),
    "vmoe_timm_b32_e8_last2": (dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
                          dict(moe_layers="last-2", num_experts=8), f"vit_base_patch32_224.{_TAG}"),
    "vmoe_timm_l16_e8_every2": (dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
                           dict(moe_layers="every-2", num_experts=8), f"vit_large_patch16_224.{_TAG}"),
}
UPCYCLE_FROM = {name: dense for name, (_, _, dense) in VMOE_MODELS.items()}


def _cfg(dense: str) -> dict[str, Any]:
    # The hub id points at timm's dense weights: loading them runs the upcycling filter below.
    return dict(
        hf_hub_id=f"timm/{dense}", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9,
        interpolation="bicubic", fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        first_conv="patch_embed.proj", classifier="head", license="apache-2.0", paper_ids="arXiv:2106.05974",
        description=f"V-MoE sparse-upcycled at load time from timm's dense {dense}",
        notes=(f"upcycle_from={dense}",))


default_cfgs = generate_default_cfgs({f"{name}.{_TAG}": _cfg(dense) for name, dense in UPCYCLE_FROM.items()})


def _vit_moe(moe: MoEConfig, **vit_kwargs) -> nn.Module:
    model = VisionTransformer(**vit_kwargs)
    return convert_to_moe(model, moe)


def _upcycle_filter(state_dict: dict, model: nn.Module, upcycle_kwargs: dict[str, Any]) -> dict:
    # V-MoE weights (e.g. a save_pretrained folder) load as they are; only dense weights are upcycled.
    return hub_upcycle_filter(state_dict, model, upcycle_kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    vit_args, moe_defaults, _ = VMOE_MODELS[variant]
    upcycle_kwargs = {key: kwargs.pop(key) for key in ("expert_noise", "router_init_std") if key in kwargs}
    moe, kwargs = MoEConfig.split(kwargs, defaults=moe_defaults)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        functools.partial(_vit_moe, moe), variant, pretrained,
        pretrained_filter_fn=functools.partial(_upcycle_filter, upcycle_kwargs=upcycle_kwargs),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**vit_args, **kwargs})


def _entrypoint(name: str, doc: str, create) -> None:
    def entry(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return create(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    entry.__module__ = __name__
    globals()[name] = register_model(entry)


_DOCS = {
    "ti16_e8_every2": "ViT-Ti/16 (timm), 8 experts, K=2, MoE in every 2nd block",
    "s16_e8_every2": "ViT-S/16 (timm: 384 wide, 12 blocks), 8 experts, K=2, MoE in every 2nd block",
    "s32_e8_last2": "ViT-S/32 (timm: 384 wide, 12 blocks), 8 experts, K=2, MoE in the last 2 odd blocks",
    "b16_e8_every2": "ViT-B/16 (timm), 8 experts, K=2, MoE in every 2nd block",
    "b32_e8_last2": "ViT-B/32 (timm), 8 experts, K=2, MoE in the last 2 odd blocks",
    "l16_e8_every2": "ViT-L/16 (timm), 8 experts, K=2, MoE in every 2nd block",
}
for _suffix, _doc in _DOCS.items():
    _entrypoint(f"vmoe_timm_{_suffix}", f"{_doc}; upcycles timm's dense augreg weights.", _create)
