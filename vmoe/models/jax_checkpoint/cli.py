"""``vmoe convert PREFIX --out DIR``: a reference (JAX) checkpoint -> ``model.safetensors`` + configs.

DIR/model.safetensors  the weights (timm / vmoe key names), written atomically
DIR/config.json        the architecture read from the checkpoint and the keyword arguments of
                       ``vmoe.models.create_vmoe`` ("create_vmoe") and of ``timm.create_model`` ("timm")
DIR/model.yaml         a ``model:`` section for ``vmoe fit/test --config ... --config DIR/model.yaml``
                       (fine-tuning: num_classes / img_size come from the data; head reset, pos-embed resampled)

The three files appear together or not at all (written into a hidden sibling folder that then replaces DIR,
see :func:`vmoe.io_folder.atomic_folder`): a killed conversion never leaves new weights beside an older
conversion's configs, and the next conversion removes its leftovers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...io import atomic_write
from ...io_folder import atomic_folder

__all__ = ["convert", "convert_main", "CONFIG_FORMAT"]

CONFIG_FORMAT = "vmoe-convert/1"
_VIT_FROM_DATA = ("num_classes", "img_size", "in_chans")


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _fit_model_section(create: dict[str, Any], weights: Path) -> dict[str, Any]:
    from ...moe.config import MoEConfig  # imported when converting, so that `vmoe convert --help` stays light

    moe_names = MoEConfig.field_names()
    vit = {key: value for key, value in create.items()
           if key not in moe_names and key not in _VIT_FROM_DATA and key != "backbone"}
    section = {"backbone": create["backbone"], "model_kwargs": vit, "checkpoint_path": str(weights)}
    section.update({key: create[key] for key in moe_names if key in create})
    return section


def _yaml(obj: Any, indent: int = 0) -> str:
    # JSON scalars are valid YAML; nested dicts as block mappings keep the file readable.
    pad = "  " * indent
    lines = []
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(value, indent + 1))
        else:
            lines.append(f"{pad}{key}: {json.dumps(value)}")
    return "\n".join(lines)


def convert(prefix: str | os.PathLike, out: str | os.PathLike, *, k: int | None = None,
            group_size: int | None = None, capacity_factor: float = 1.05,
            eval_capacity_factor: float | None = None, batch_priority: bool = False,
            bfloat16_dispatch: bool = False, ensemble_size: int | None = None) -> Path:
    """Convert the checkpoint at ``prefix`` into DIR ``out`` (see the module docstring); returns DIR.

    The routing settings (the checkpoint does not store them) go into the configs; the model is rebuilt
    and its weights loaded strictly before anything is written, so a failed conversion writes nothing.
    """
    from ..checkpoint import save_weights
    from .model import build_reference_model, reference_model_config
    from .reader import read_reference_checkpoint

    routing = dict(k=k, group_size=group_size, capacity_factor=capacity_factor,
                   eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                   bfloat16_dispatch=bfloat16_dispatch)
    model = build_reference_model(read_reference_checkpoint(prefix), ensemble_size=ensemble_size, **routing)
    arch = model.reference_architecture
    create = reference_model_config(arch, **routing)
    out = Path(out)
    weights = (out / "model.safetensors").resolve()
    timm_kwargs = {key: value for key, value in create.items() if key != "backbone"}
    config = {
        "format": CONFIG_FORMAT,
        "source": os.fspath(prefix),
        "architecture": arch.to_dict(),
        "create_vmoe": create,
        # timm drops a pretrained head whose class count differs from the pretrained_cfg's, hence num_classes.
        "timm": {"model_name": "vmoe_reference", "kwargs": timm_kwargs,
                 "pretrained_cfg_overlay": {"file": str(weights), "num_classes": arch.num_classes}},
        "weights": weights.name,
    }
    with atomic_folder(out) as tmp:
        save_weights(model, tmp / weights.name, metadata={"vmoe_convert": json.dumps(config)})
        _write_text(tmp / "config.json", json.dumps(config, indent=1) + "\n")
        _write_text(tmp / "model.yaml", f"# written by vmoe convert from {os.fspath(prefix)}\nmodel:\n"
                    + _yaml(_fit_model_section(create, weights), 1) + "\n")
    return out


def convert_main(argv: list[str] | None = None) -> None:
    """Entry point of ``vmoe convert``."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="vmoe convert", description="Convert a JAX V-MoE / E³ checkpoint (<PREFIX>.index + "
                       "<PREFIX>.data-*) into model.safetensors + config.json + model.yaml.")
    p.add_argument("prefix", type=str, help="checkpoint prefix, e.g. ckpts/vmoe_s32_last2_ilsvrc2012_randaug_light1")
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--k", type=int | None, default=None, help="experts per token (default 2; E³: 1)")
    p.add_argument("--group_size", type=int | None, default=None, help="routing rows per group (None: whole batch)")
    p.add_argument("--capacity_factor", type=float, default=1.05)
    p.add_argument("--eval_capacity_factor", type=float | None, default=None)
    p.add_argument("--batch_priority", type=bool, default=False)
    p.add_argument("--bfloat16_dispatch", type=bool, default=False)
    p.add_argument("--ensemble_size", type=int | None, default=None,
                   help="E³ ensemble size when the router kernels are stored flat [D, E]")
    args = p.parse_args(argv)
    out = convert(args.prefix, args.out, k=args.k, group_size=args.group_size, capacity_factor=args.capacity_factor,
                  eval_capacity_factor=args.eval_capacity_factor, batch_priority=args.batch_priority,
                  bfloat16_dispatch=args.bfloat16_dispatch, ensemble_size=args.ensemble_size)
    print(f"wrote {out / 'model.safetensors'}, {out / 'config.json'}, {out / 'model.yaml'}")
