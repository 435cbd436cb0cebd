"""The timm names vmoe registers, and small builds of them for timm's model tests (test_timm_models.py).

timm's tests build every model at its registered size and 224 px; on a 2-core CPU that takes minutes per
name, so each vmoe name is built here with its own patch size, MoE placement, experts, router and head but
a 4-block, 32-wide trunk on a 2x2 patch grid, and its pretrained_cfg says that input size. Routing groups
span the whole test batch (a released checkpoint's tag routes groups of 8 images' tokens, which a batch of
one image cannot fill; timm drops None keywords, so the blocks' settings are changed after the build). The
full-size builds are checked on the meta device (tests/test_models_timm_suite.py).
"""
from __future__ import annotations

import functools
from typing import Any

import timm
import torch
from timm.models import model_entrypoint

from vmoe.moe import iter_moe_mlps

SMALL_TRUNK = dict(embed_dim=32, depth=4, num_heads=2)


def is_vmoe_name(name: str) -> bool:
    """True for a timm name (with or without a pretrained tag) registered by the vmoe package."""
    return model_entrypoint(name.split(".")[0]).__module__.startswith("vmoe.")


def vmoe_names(**list_kwargs: Any) -> list[str]:
    """``timm.list_models(**list_kwargs)`` restricted to vmoe's names."""
    return [name for name in timm.list_models(**list_kwargs) if is_vmoe_name(name)]


@functools.lru_cache(maxsize=None)
def _shape(name: str) -> tuple[int, int | None]:
    """(patch size, representation size) of a registered name (tag included), from a meta-device build."""
    with torch.device("meta"):
        model = timm.create_model(name)
    return model.patch_embed.patch_size[0], getattr(model, "representation_size", None)


def small_kwargs(name: str) -> dict[str, Any]:
    patch, representation = _shape(name)
    # the released architectures' representation layer is as wide as the trunk (R = D), and so is the small one
    extra = dict(representation_size=SMALL_TRUNK["embed_dim"]) if representation else {}
    return dict(SMALL_TRUNK, img_size=2 * patch, **extra)


def small_input_size(name: str) -> tuple[int, int, int]:
    size = small_kwargs(name)["img_size"]
    return (3, size, size)


def create_small_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """timm.create_model of a vmoe name with the small trunk (any other name: unchanged)."""
    if not is_vmoe_name(name):
        return timm.create_model(name, **kwargs)
    model = timm.create_model(name, **{**small_kwargs(name), **kwargs})
    for _, layer in iter_moe_mlps(model):
        layer.settings = layer.settings.replace(group_size=None)  # the whole test batch is one routing group
    cfg = {**model.pretrained_cfg, "input_size": small_input_size(name)}
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def small_cfg_value(name: str, key: str) -> Any:
    """timm.get_pretrained_cfg_value, with the small input size for vmoe names."""
    if key == "input_size" and is_vmoe_name(name):
        return small_input_size(name)
    return timm.get_pretrained_cfg_value(name, key)
