"""What a V-MoE built from a timm ViT calls itself: the generic ``vmoe`` timm name and the arguments that
rebuild it (used by ``convert_to_moe`` when it builds, by :mod:`vmoe.models.hub` when it saves and loads)."""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["GENERIC_NAME", "record_moe_args", "is_vmoe_architecture", "record_input_size"]

GENERIC_NAME = "vmoe"


def is_vmoe_architecture(name: str | None) -> bool:
    return name == GENERIC_NAME or (name or "").startswith("vmoe_")


def record_moe_args(model: nn.Module, moe: dict[str, Any]) -> None:
    """Mark a timm-built ViT that has just been converted to a V-MoE as the generic ``vmoe`` architecture.

    timm records the kwargs a model was created with in ``model._model_args`` (what ``save_for_hf`` exports);
    the dense ``backbone`` name and the MoE settings are added, so the exported config rebuilds the V-MoE and
    not the dense ViT. Models without a timm pretrained_cfg (e.g. a bare VisionTransformer inside a registry
    builder) and models already named as V-MoEs are left alone.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not arch or is_vmoe_architecture(arch):
        return
    cfg = dict(cfg, architecture=GENERIC_NAME)
    model.pretrained_cfg = model.default_cfg = cfg
    moe = {key: (list(value) if isinstance(value, tuple) else value) for key, value in moe.items()}
    model._model_args = {**getattr(model, "_model_args", {}), "backbone": arch, **moe}


def record_input_size(model: nn.Module) -> nn.Module:
    """Make ``model.pretrained_cfg["input_size"]`` the size the model was built for (timm keeps the registered
    224 px when ``img_size`` is passed), so ``timm.data.resolve_data_config(model=model)`` gives the real size.
    Models without a patch embedding or a pretrained_cfg are returned unchanged."""
    cfg = getattr(model, "pretrained_cfg", None)
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if not isinstance(cfg, dict) or size is None or embed.proj is None:
        return model
    want = (embed.proj.in_channels, *size)
    if tuple(cfg.get("input_size") or ()) != want:
        model.pretrained_cfg = model.default_cfg = dict(cfg, input_size=want)
    return model
