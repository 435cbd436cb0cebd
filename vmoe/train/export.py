"""``vmoe export CKPT --out DIR``: a trained Lightning checkpoint as a timm folder (config.json + safetensors).

The network and its hyper-parameters come from the checkpoint (a checkpoint written with the EMA callback
holds the averaged weights, and so does the export). The preprocessing (mean, std, image size, crop) comes
from the training datamodule, found like ``vmoe visualize`` finds it: ``--config`` or the config.yaml that
LightningCLI saved next to ``checkpoints/``; without one the backbone's pretrained_cfg is kept. That file may
come from someone else: only vmoe's own datamodules (or ``--allow_class`` ones) are instantiated from it, with
the CLI's typed conversion (:mod:`vmoe.train.config_policy`). Weights holding NaN/inf are refused, and the
folder appears as a whole or not at all (``save_pretrained``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["export_checkpoint", "datamodule_preprocessing", "main"]


def datamodule_preprocessing(data: dict[str, Any], *, source: str = "the data section",
                             allowed: Iterable[str] = ()) -> tuple[dict[str, Any], list[str] | None]:
    """(data_config for timm, class names or None) of a training YAML's ``data`` section (from ``source``).

    The datamodule is only constructed (no data is read), so its normalisation and size are known; it must be
    one of vmoe's or named in ``allowed`` (see :func:`vmoe.train.config_policy.allowed_class`).
    """
    from lightning import LightningDataModule

    from .config_policy import allowed_class, instantiate_typed
    from .data import class_names

    cls = allowed_class(data.get("class_path"), LightningDataModule, source=f"{source}: data", allowed=allowed)
    dm = instantiate_typed(cls, data.get("init_args"), source=f"{source}: data")
    size = int(dm.img_size)
    config: dict[str, Any] = {"mean": tuple(dm.mean), "std": tuple(dm.std), "input_size": (dm.in_chans, size, size)}
    for key in ("crop_pct", "interpolation", "crop_mode"):
        value = getattr(dm, key, None)
        if value is not None:
            config[key] = value
    return config, class_names(dm)


def export_checkpoint(ckpt_path: str, out: str, config: str | None = None, allow_class: Iterable[str] = ()) -> Path:
    """Write the network of ``ckpt_path`` (an ImageClassifier .ckpt) into ``out`` with ``save_pretrained``.
    ``allow_class``: datamodule class paths outside vmoe that the training config may name."""
    from vmoe.models.checkpoint import check_finite_weights
    from vmoe.models.hub import save_pretrained
    from .from_checkpoint import load_classifier, resolve_data_config

    network = load_classifier(ckpt_path, "cpu").model
    check_finite_weights(network.state_dict(), f"vmoe export {ckpt_path}: nothing was written")
    data, source = resolve_data_config(ckpt_path, config)
    data_config, names = None, None
    if data is not None:
        data_config, names = datamodule_preprocessing(data, source=source, allowed=allow_class)
        print(f"preprocessing from {source}: mean {data_config['mean']}, std {data_config['std']}, "
              f"input {data_config['input_size']}")
    else:
        print("no training config found (pass --config): the export keeps the backbone's pretrained_cfg "
              "normalisation, which may not be what the model was trained with")
    folder = save_pretrained(network, out, data_config=data_config, label_names=names)
    arch = network.pretrained_cfg["architecture"]
    print(f"wrote {folder / 'config.json'} and {folder / 'model.safetensors'} (architecture {arch!r}); load with "
          f"`import vmoe, timm; timm.create_model('local-dir:{folder}', pretrained=True)`")
    return folder


def main(argv: list[str] | None = None) -> None:
    """Entry of ``vmoe export CKPT --out DIR [--config TRAINING_YAML]``."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="vmoe export", description="Export a trained checkpoint as a timm/Hugging Face folder "
                                                       "(config.json + model.safetensors).")
    p.add_argument("ckpt_path", type=str, help="Lightning checkpoint written by vmoe fit")
    p.add_argument("--out", type=str, required=True, help="output folder (created)")
    p.add_argument("--config", type=Optional[str], default=None,
                   help="training YAML for the preprocessing (default: the config.yaml saved with the checkpoint)")
    p.add_argument("--allow_class", type=list[str], default=[],
                   help="datamodule class paths outside vmoe that the training config may name (a config beside a "
                        "checkpoint may come from someone else: only vmoe.* classes are instantiated otherwise)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    export_checkpoint(args.ckpt_path, args.out, args.config, args.allow_class)
