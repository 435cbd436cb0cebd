"""An ImageClassifier from a Lightning checkpoint written by ``vmoe fit``: the one rule shared by the ``vmoe``
commands (``--ckpt_path`` of test/validate/predict/fit) and ``vmoe visualize`` / ``vmoe sweep``.

The network weights come from the checkpoint, so the arguments that only choose the *starting* weights
(a dense file to upcycle, timm's pretrained weights) are switched off: the file they named may be gone, and
``upcycle_kwargs`` without a source is an error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from torch import nn

from ..models.checkpoint import check_finite_weights, read_checkpoint

__all__ = ["STARTING_WEIGHTS", "read_lightning_checkpoint", "classifier_hparams", "load_classifier",
           "resolve_data_config", "data_defaults_from_checkpoint"]

# Model arguments that only choose the starting weights, and their "none" values.
STARTING_WEIGHTS: dict[str, Any] = {"checkpoint_path": None, "pretrained": False, "upcycle_kwargs": None}


def read_lightning_checkpoint(path: str | os.PathLike, option: str = "--ckpt_path") -> dict[str, Any]:
    """The checkpoint dict of a ``vmoe fit`` .ckpt, or a ValueError naming ``option``, the file and what is wrong
    (missing, empty, truncated, network weights instead of a training state, NaN/inf weights, ...)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _sharded_checkpoint_meta(path, option)
    if path.endswith(".safetensors"):
        raise ValueError(f"{option} {path}: a .safetensors file holds network weights only, while {option} takes a "
                         "Lightning .ckpt written by `vmoe fit` (weights, hyper-parameters, optimizer and loop "
                         "state); to start from network weights pass --model.checkpoint_path instead")
    try:
        ckpt = read_checkpoint(path)
    except FileNotFoundError as err:
        raise ValueError(f"{option} {path}: no such checkpoint file") from err
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{option} {path} is not a Lightning checkpoint of an ImageClassifier (it has {keys}; "
                         "expected state_dict and hyper_parameters, as `vmoe fit` writes); network weights go to "
                         "--model.checkpoint_path")
    if isinstance(ckpt["state_dict"], Mapping):  # the check load_weights applies: neither resumed nor evaluated
        check_finite_weights(ckpt["state_dict"], f"{option} {path}",
                             hint="  (use an earlier checkpoint of the run, e.g. its best-*.ckpt)")
    return dict(ckpt)


def _sharded_checkpoint_meta(path: str, option: str) -> dict[str, Any]:
    """A sharded (DCP) checkpoint directory: its meta.pt (hyper-parameters, loops); the tensors are read by the
    expert-parallel strategy that loads it."""
    from ..distributed.dcp import META_FILE, is_sharded_checkpoint

    if not is_sharded_checkpoint(path):
        raise ValueError(f"{option} {path} is a directory but not a sharded checkpoint (expected .metadata and "
                         f"{META_FILE}, as an expert-parallel strategy with state_dict_type='sharded' writes)")
    meta = dict(read_checkpoint(os.path.join(path, META_FILE)))
    if "hyper_parameters" not in meta:
        raise ValueError(f"{option} {path} has no hyper_parameters in {META_FILE}; not written by `vmoe fit`")
    return meta


def classifier_hparams(hparams: Mapping[str, Any], keep: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """ImageClassifier arguments from a checkpoint's hyper-parameters: private entries dropped, starting-weight
    arguments switched off except those in ``keep`` (e.g. given explicitly on the command line)."""
    out = {k: v for k, v in hparams.items() if not k.startswith("_")}
    out.update({k: v for k, v in STARTING_WEIGHTS.items() if k not in keep})
    return out


def load_classifier(ckpt_path: str | os.PathLike, device: str = "auto") -> nn.Module:
    """The ImageClassifier of a ``vmoe fit`` checkpoint, in eval mode on ``device`` ("auto": CUDA if available)."""
    import torch

    from .module import ImageClassifier

    checkpoint = read_lightning_checkpoint(ckpt_path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = ImageClassifier(**classifier_hparams(checkpoint["hyper_parameters"]))
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(device).eval()


def resolve_data_config(ckpt_path: str, config: str | None) -> tuple[dict | None, str | None]:
    """The ``data`` section ({class_path, init_args}) of the training YAML, and where it came from.

    ``config`` given: that file (it must have a ``data`` section). Otherwise the config.yaml LightningCLI
    saves in the run's log dir (``<log_dir>/checkpoints/x.ckpt`` -> ``<log_dir>/config.yaml``), if any.
    """
    candidates = [Path(config)] if config else [Path(ckpt_path).resolve().parent.parent / "config.yaml",
                                                 Path(ckpt_path).resolve().parent / "config.yaml"]
    for path in candidates:
        if not path.is_file():
            if config:
                raise ValueError(f"--config {config}: no such file")
            continue
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if data is None:
            if config:
                raise ValueError(f"--config {config} has no 'data' section (expected a training YAML with "
                                 "data: {class_path: ..., init_args: ...})")
            continue
        if isinstance(data, str):
            data = {"class_path": data}
        if "class_path" not in data:
            raise ValueError(f"{path}: the data section needs a class_path (e.g. "
                             f"vmoe.train.data.FashionMNISTDataModule), got keys {sorted(data)}")
        return data, str(path)
    return None, None


def data_defaults_from_checkpoint(parser: Any, ckpt_path: str | None, config: str | None) -> str | None:
    """For commands that evaluate a checkpoint on a datamodule (visualize, sweep, fewshot): check the
    checkpoint first (a missing or damaged one is reported as such through ``parser.error``, before any
    complaint about the data), then make the training run's ``data`` section the parser's default.
    Returns where that section came from, or None.

    A config.yaml found beside the checkpoint (not passed as ``config``) may come from someone else: a class
    outside vmoe named there is not used (nor imported), and a note says how to choose the data instead."""
    import sys

    from .config_policy import is_project_class

    if ckpt_path is None:
        return None
    try:
        read_lightning_checkpoint(ckpt_path)
    except ValueError as err:
        parser.error(str(err))
    data, source = resolve_data_config(ckpt_path, config)
    if data is not None and config is None and not (isinstance(data.get("class_path"), str)
                                                    and is_project_class(data["class_path"])):
        sys.stderr.write(f"note: {source} names data class_path {data.get('class_path')!r}, which is not one of "
                         "vmoe's classes; a config found beside a checkpoint may only name vmoe.* classes, so it is "
                         "not used (pass --config <a training YAML you trust> or --data CLASS)\n")
        return None
    if data is not None:
        parser.set_defaults(data=data)
    return source
