"""Share a V-MoE the timm way: ``save_pretrained``, read back by timm through the generic ``vmoe`` name.

``save_pretrained(model, dir)`` writes ``config.json`` (timm's format: ``architecture``, ``model_args``,
``pretrained_cfg``) and ``model.safetensors``; after ``import vmoe``,
``timm.create_model("local-dir:" + dir, pretrained=True)`` rebuilds the same V-MoE (same MoE placement,
expert counts and routing settings) with its weights loaded as they are, and so does ``hf-hub:<id>`` once the
folder is uploaded (``timm.models.push_to_hf_hub`` or ``huggingface-cli upload``).

A V-MoE built from any timm ViT (``create_vmoe`` / ``convert_to_moe``) calls itself ``vmoe``: the generic name
of :mod:`vmoe.models.timm_names`, whose ``model_args`` hold the dense ``backbone`` and the MoE settings. The
``vmoe_*`` names keep their own names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..io_folder import atomic_folder
from ..moe import iter_moe_mlps
from .checkpoint import check_finite_weights
from .naming import is_vmoe_architecture

__all__ = ["save_pretrained"]


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, model_args: dict[str, Any] | None = None,
                    data_config: dict[str, Any] | None = None, label_names: list[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``save_directory`` (created) for timm's loaders.

    ``model``: a timm model (dense ViT, ``create_vmoe`` / ``convert_to_moe`` V-MoE, or a ``vmoe_*`` name).
    ``model_args``: extra or replacement reconstruction arguments (JSON values). ``data_config``: the
    preprocessing the weights expect (mean, std, input_size, crop_pct, interpolation), stored in the
    pretrained_cfg so ``timm.data.resolve_data_config`` returns it. Weights with NaN/inf values are refused
    (``load_weights`` would refuse the file). Both files are written into a hidden sibling folder that then
    replaces ``save_directory`` (:func:`vmoe.io_folder.atomic_folder`): they appear together or not at all, and
    a killed save's leftover is removed by the next. Returns the folder.
    """
    from timm.models import save_for_hf

    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not cfg.get("architecture"):
        raise ValueError(f"save_pretrained needs a model built by timm (with a pretrained_cfg naming its "
                         f"architecture); got {type(model).__name__}")
    arch = cfg["architecture"]
    if any(True for _ in iter_moe_mlps(model)) and not is_vmoe_architecture(arch):
        raise ValueError(f"the model has MoE layers but calls itself {arch!r} (a dense architecture): build it with "
                         "vmoe.models.create_vmoe / convert_to_moe / a vmoe_* name, or pass the architecture's "
                         "model_args yourself")
    check_finite_weights(model.state_dict(), f"save_pretrained({save_directory!s})")
    out = Path(save_directory)
    model_config = {"label_names": list(label_names)} if label_names else None
    with atomic_folder(out) as tmp:
        save_for_hf(model, str(tmp), model_config=model_config, model_args=model_args, safe_serialization=True,
                    data_config=data_config)
    return out
