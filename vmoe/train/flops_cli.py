"""``vmoe flops``: the cost table of a backbone and its V-MoE (:func:`vmoe.models.flops.report`), or, with
``--config configs/quickstart.yaml``, of the model a training config builds.

The model section gives the network (backbone, model_kwargs, MoE settings); the data section gives
num_classes, in_chans and img_size, as the CLI links them. The dense row is the same ViT with
``moe_layers: null``; a dense config prints only that row.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Sequence

import torch
import yaml

from ..models.build import build_network
from ..models.flops import flops_table, model_cost, report
from ..moe import MoEConfig, iter_moe_mlps

__all__ = ["load_training_config", "config_cost_table", "main"]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_training_config(paths: Sequence[str]) -> dict:
    """The training YAMLs merged in order (later files win key by key), as LightningCLI merges --config."""
    merged: dict = {}
    for path in paths:
        try:
            with open(path) as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as err:
            raise ValueError(f"--config {path}: cannot read it ({err})") from err
        if not isinstance(cfg, dict):
            raise ValueError(f"--config {path}: expected a YAML mapping with model/data sections")
        merged = _merge(merged, cfg)
    return merged


def _data_shape(data: dict | None) -> dict[str, int]:
    """num_classes, in_chans, img_size of the config's datamodule (constructed, no data read)."""
    if not data:
        return {}
    data = {"class_path": data} if isinstance(data, str) else data
    module_name, _, cls_name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name or f"{__package__}.data"), cls_name)
    init_args = data.get("init_args") or {}
    try:
        dm = cls(**init_args)
    except (OSError, ValueError) as err:  # e.g. an ImageFolder config whose directories are not on this machine
        print(f"note: {cls_name} cannot be constructed here ({err}); using its img_size and 1000 classes")
        return {"img_size": int(init_args.get("img_size", 224))}
    return {"num_classes": int(dm.num_classes), "in_chans": int(dm.in_chans), "img_size": int(dm.img_size)}


def config_cost_table(paths: Sequence[str]) -> str:
    """The flops_table of the config's model (and of its dense counterpart), with a title line."""

    cfg = load_training_config(paths)
    model: dict[str, Any] = cfg.get("model") or {}
    if "class_path" in model:
        model = model.get("init_args") or {}
    shape = {"num_classes": 1000, "in_chans": 3, "img_size": 224,
             **{k: model[k] for k in ("num_classes", "in_chans", "img_size") if k in model},
             **_data_shape(cfg.get("data"))}
    backbone = model.get("backbone", "vit_small_patch16_224")
    common = dict(model_kwargs=model.get("model_kwargs"), **shape)
    moe_layers = model.get("moe_layers", "every-2")
    with torch.device("meta"):
        dense = build_network(backbone, moe=None, **common)
        costs = [model_cost(dense, f"{backbone} (dense)")]
        if moe_layers is not None:
            moe, _ = MoEConfig.split(model)
            net = build_network(backbone, moe=moe, **common)
            k = next(layer for _, layer in iter_moe_mlps(net)).experts_per_token
            # Only token-choice routers have a K; soft and expert choice are named by their scheme.
            scheme = f"K{k}" if k is not None and moe.router != "expert_choice" else moe.router
            costs.append(model_cost(net, f"V-MoE E{moe.num_experts} {scheme} {moe_layers}"))
    title = (f"{', '.join(paths)}: {backbone} {model.get('model_kwargs') or ''} at {shape['img_size']}px, "
             f"{shape['in_chans']} channel(s), {shape['num_classes']} classes")
    return title + "\n" + flops_table(costs)


def main(argv: list[str] | None = None) -> None:
    """``vmoe flops --backbone vit_small_patch16_224 --num_experts 8 --k 2 --moe_layers every-2``, or
    ``vmoe flops --config configs/quickstart.yaml [--config more.yaml]`` for the model of a training config."""
    from jsonargparse import CLI

    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--config" or a.startswith("--config=") for a in args):
        paths, rest, it = [], [], iter(args)
        for a in it:
            if a == "--config":
                paths.append(next(it, None) or "")
            elif a.startswith("--config="):
                paths.append(a.split("=", 1)[1])
            else:
                rest.append(a)
        if rest or not all(paths):
            raise SystemExit(f"vmoe flops --config takes only (repeated) --config FILE; got also {rest or 'an empty path'}")
        print(config_cost_table(paths))
        return
    CLI(report, args=args, as_positional=False, allow_abbrev=False)
