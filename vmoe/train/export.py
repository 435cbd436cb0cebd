"""``vmoe export CKPT --out DIR``: a trained Lightning checkpoint as a timm folder (config.json + safetensors),
or with ``--format onnx`` as DIR/model.onnx for ONNX Runtime (:mod:`vmoe.models.onnx_export`), with the
routing settings given as ``vmoe test`` takes them (``--model.eval_capacity_factor``, ``--model.batch_priority``,
``--model.group_size``) frozen into the graph.

The network and its hyper-parameters come from the checkpoint (a checkpoint written with the EMA callback
holds the averaged weights, and so does the export). The preprocessing (mean, std, image size, crop) comes
from the training datamodule, found like ``vmoe visualize`` finds it: ``--config`` or the config.yaml that
LightningCLI saved next to ``checkpoints/``; without one the backbone's pretrained_cfg is kept. That file may
come from someone else: only vmoe's own datamodules (or ``--allow_class`` ones) are instantiated from it, with
the CLI's typed conversion (:mod:`vmoe.train.config_policy`). Weights holding NaN/inf are refused, and the
folder appears as a whole or not at all (``save_pretrained``).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

__all__ = ["export_checkpoint", "export_checkpoint_onnx", "datamodule_preprocessing", "main"]


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


def export_checkpoint_onnx(ckpt_path: str, out: str, config: str | None = None, *,
                           eval_capacity_factor: float | None = None, batch_priority: bool | None = None,
                           group_size: int | None = None, batch_size: int = 1, dynamic_batch: bool | None = None,
                           opset: int = 18, allow_class: Iterable[str] = ()) -> Path:
    """Write the network of ``ckpt_path`` as ``out``/model.onnx; routing settings None keep the checkpoint's.

    The preprocessing (when a training config is found) and class names go into the model's metadata_props.
    With onnxruntime installed, the file is run once on random images and compared with eager PyTorch.
    """
    import json

    import torch

    from vmoe.models import routing_settings
    from vmoe.models.checkpoint import check_finite_weights
    from vmoe.models.onnx_export import export_onnx, input_shape
    from vmoe.moe import iter_moe_mlps
    from .from_checkpoint import load_classifier, resolve_data_config

    network = load_classifier(ckpt_path, "cpu").model
    check_finite_weights(network.state_dict(), f"vmoe export {ckpt_path}: nothing was written")
    data, source = resolve_data_config(ckpt_path, config)
    metadata: dict[str, Any] = {"architecture": network.pretrained_cfg.get("architecture")}
    if data is not None:
        data_config, names = datamodule_preprocessing(data, source=source, allowed=allow_class)
        metadata.update(preprocessing=data_config, label_names=names)
        print(f"preprocessing from {source} (in the model's metadata_props): mean {data_config['mean']}, "
              f"std {data_config['std']}, input {data_config['input_size']}")
    size = {} if group_size is None else {"group_size": group_size}
    path = export_onnx(network, Path(out) / "model.onnx", eval_capacity_factor=eval_capacity_factor,
                       batch_priority=batch_priority, batch_size=batch_size, dynamic_batch=dynamic_batch,
                       opset=opset, metadata=metadata, **size)
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
    batch = "dynamic" if props["dynamic_batch"] else f"fixed at {props['batch_size']}"
    print(f"wrote {path} (opset {opset}, batch {batch}, eval_capacity_factor {props.get('eval_capacity_factor')}, "
          f"batch_priority {props.get('batch_priority')}, group_size {props.get('group_size')})")
    try:
        import onnxruntime
    except ImportError:
        return path
    x = torch.randn(props["batch_size"] or 2, *input_shape(network))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    has_moe = any(True for _ in iter_moe_mlps(network))
    settings = (routing_settings(network, eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                                 group_size=props.get("group_size")) if has_moe else contextlib.nullcontext())
    with torch.no_grad(), settings:
        want = network(x).numpy()
    diff = abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - want).max()
    print(f"ONNX Runtime vs eager PyTorch on random images: max |difference| {diff:.2e}")
    return path


def main(argv: list[str] | None = None) -> None:
    """Entry of ``vmoe export CKPT --out DIR [--config TRAINING_YAML]``."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="vmoe export", description="Export a trained checkpoint as a timm/Hugging Face folder "
                                                       "(config.json + model.safetensors) or, with --format onnx, "
                                                       "as DIR/model.onnx for ONNX Runtime.")
    p.add_argument("ckpt_path", type=str, help="Lightning checkpoint written by vmoe fit")
    p.add_argument("--out", type=str, required=True, help="output folder (created)")
    p.add_argument("--config", type=Optional[str], default=None,
                   help="training YAML for the preprocessing (default: the config.yaml saved with the checkpoint)")
    p.add_argument("--allow_class", type=list[str], default=[],
                   help="datamodule class paths outside vmoe that the training config may name (a config beside a "
                        "checkpoint may come from someone else: only vmoe.* classes are instantiated otherwise)")
    p.add_argument("--format", type=Literal["timm", "onnx"], default="timm",
                   help="timm: config.json + model.safetensors; onnx: model.onnx (needs pip install -e \".[onnx]\")")
    p.add_argument("--model.eval_capacity_factor", type=Optional[float], default=None,
                   help="onnx: eval capacity factor frozen into the graph (default: the checkpoint's)")
    p.add_argument("--model.batch_priority", type=Optional[bool], default=None,
                   help="onnx: Batch Priority Routing on/off in the graph (default: the checkpoint's)")
    p.add_argument("--model.group_size", type=Optional[int], default=None,
                   help="onnx: tokens per routing group (default: the checkpoint's); a divisor of the tokens per "
                        "image gives a dynamic batch axis")
    p.add_argument("--batch_size", type=int, default=1, help="onnx: the batch size when the batch axis is fixed")
    p.add_argument("--dynamic_batch", type=Optional[bool], default=None,
                   help="onnx: require (true) or refuse (false) a dynamic batch axis (default: when possible)")
    p.add_argument("--opset", type=int, default=18, help="onnx: opset version (>= 18)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    model = args.model
    onnx_only = {"--model.eval_capacity_factor": model.eval_capacity_factor, "--model.batch_priority":
                 model.batch_priority, "--model.group_size": model.group_size, "--dynamic_batch": args.dynamic_batch,
                 "--batch_size": None if args.batch_size == 1 else args.batch_size,
                 "--opset": None if args.opset == 18 else args.opset}
    if args.format == "timm":
        given = [name for name, value in onnx_only.items() if value is not None]
        if given:
            p.error(f"{given} apply to --format onnx only (a timm folder holds the weights; routing settings "
                    "are chosen when the model is loaded)")
        export_checkpoint(args.ckpt_path, args.out, args.config, args.allow_class)
        return
    try:
        export_checkpoint_onnx(args.ckpt_path, args.out, args.config, eval_capacity_factor=model.eval_capacity_factor,
                               batch_priority=model.batch_priority, group_size=model.group_size,
                               batch_size=args.batch_size, dynamic_batch=args.dynamic_batch, opset=args.opset,
                               allow_class=args.allow_class)
    except (ValueError, ImportError) as err:
        raise SystemExit(f"vmoe export: {err}") from err
