"""``vmoe convert PREFIX --out DIR``: a reference (JAX) checkpoint -> ``model.safetensors`` + configs.

DIR/model.safetensors  the weights (timm / vmoe key names), written atomically
DIR/config.json        timm's folder format (``timm.create_model("local-dir:DIR", pretrained=True)``: architecture,
                       model_args, pretrained_cfg with the real input size), plus the architecture read from the
                       checkpoint ("reference_architecture") and the keyword arguments of
                       ``vmoe.models.create_vmoe`` ("create_vmoe")
DIR/model.yaml         a ``model:`` section for ``vmoe fit/test --config ... --config DIR/model.yaml``
                       (fine-tuning: num_classes / img_size come from the data; head reset, pos-embed resampled)

The three files appear together or not at all (written into a hidden sibling folder that then replaces DIR,
see :func:`vmoe.io_folder.atomic_folder`): a killed conversion never leaves new weights beside an older
conversion's configs, and the next conversion removes its leftovers.

Both configs name the weights relative to DIR ("model.safetensors"), so the folder can be moved or shared;
the CLI resolves a model.yaml's relative checkpoint_path against the folder of that file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...io import atomic_write
from ...io_folder import atomic_folder

__all__ = ["convert", "convert_main", "CONFIG_FORMAT"]

CONFIG_FORMAT = "vmoe-convert/2"
WEIGHTS = "model.safetensors"
_VIT_FROM_DATA = ("num_classes", "img_size", "in_chans")


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _fit_model_section(create: dict[str, Any], weights: str) -> dict[str, Any]:
    from ...moe.config import MoEConfig  # imported when converting, so that `vmoe convert --help` stays light

    moe_names = MoEConfig.field_names()
    vit = {key: value for key, value in create.items()
           if key not in moe_names and key not in _VIT_FROM_DATA and key != "backbone"}
    section = {"backbone": create["backbone"], "model_kwargs": vit, "checkpoint_path": weights}
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
    from .reader import read_reference_checkpoint, resolve_checkpoint_prefix

    routing = dict(k=k, group_size=group_size, capacity_factor=capacity_factor,
                   eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                   bfloat16_dispatch=bfloat16_dispatch)
    prefix = resolve_checkpoint_prefix(prefix)
    model = build_reference_model(read_reference_checkpoint(prefix), ensemble_size=ensemble_size, name=prefix,
                                  **routing)
    arch = model.reference_architecture
    create = reference_model_config(arch, **routing)
    out = Path(out)
    config = _config(prefix, arch, create)
    with atomic_folder(out) as tmp:
        save_weights(model, tmp / WEIGHTS, metadata={"vmoe_convert": json.dumps(config)})
        _write_text(tmp / "config.json", json.dumps(config, indent=1) + "\n")
        _write_text(tmp / "model.yaml", f"# written by vmoe convert from {os.fspath(prefix)}; checkpoint_path is "
                    "relative to this file's folder\nmodel:\n" + _yaml(_fit_model_section(create, WEIGHTS), 1) + "\n")
    return out


def _config(prefix: Path, arch: Any, create: dict[str, Any]) -> dict[str, Any]:
    """config.json: timm's local-dir format (architecture, num_classes, model_args, pretrained_cfg) + vmoe's keys."""
    size = arch.img_size
    pretrained_cfg = dict(
        input_size=[arch.in_chans, size, size], fixed_input_size=True, interpolation="bilinear", crop_pct=1.0,
        mean=[0.5] * arch.in_chans, std=[0.5] * arch.in_chans, num_classes=arch.num_classes,
        first_conv="patch_embed.proj", classifier="head", pool_size=None, license="apache-2.0",
        paper_ids="arXiv:2106.05974", description=f"converted by vmoe convert from {prefix.name}")
    return {
        "architecture": "vmoe_reference", "num_classes": arch.num_classes,
        "model_args": {key: value for key, value in create.items() if key != "backbone"},
        "pretrained_cfg": pretrained_cfg,
        "format": CONFIG_FORMAT, "source": os.fspath(prefix), "weights": WEIGHTS,
        "reference_architecture": arch.to_dict(), "create_vmoe": create,
    }


def convert_main(argv: list[str] | None = None) -> None:
    """Entry point of ``vmoe convert``."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="vmoe convert", description="Convert a JAX V-MoE / E³ checkpoint (<PREFIX>.index + "
                       "<PREFIX>.data-*) into model.safetensors + config.json + model.yaml.")
    p.add_argument("prefix", type=str, help="checkpoint prefix, e.g. ckpts/vmoe_s32_last2_ilsvrc2012_randaug_light1 "
                   "for ckpts/NAME.index + ckpts/NAME.data-*; the .index file or a folder with one checkpoint work too")
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
    from ..timm_names import release_of_checkpoint
    from .reader import resolve_checkpoint_prefix

    release = release_of_checkpoint(resolve_checkpoint_prefix(args.prefix))
    if release is not None:
        print(f"{release.checkpoint} is a released checkpoint; with its config's routing: "
              f"timm.create_model({release.timm_name!r}, pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={str(out / WEIGHTS)!r})).eval()")
