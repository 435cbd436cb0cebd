"""ONNX export of a (V-MoE) image classifier for ONNX Runtime, TensorRT or any runtime that reads ONNX.

The exported graph is the eval-mode network with the routing settings chosen at export (eval capacity
factor, Batch Priority Routing, group size) frozen into it: the MoE blocks use the static-capacity dispatch
(buffers [E, G*C, D], no data-dependent shapes) and the slot assignment without a stable sort
(:func:`vmoe.moe.routing.assign_slots_unique_keys`, chosen while exporting), so ONNX Runtime drops exactly
the tokens eager PyTorch drops.

Batch axis: dynamic when no MoE block's capacity depends on the batch size, i.e. every block routes groups
of ``group_size`` tokens that divide the tokens one image brings to it (T, or T*M for an E³ block with M
members). With ``group_size=None`` (the whole batch is one routing group) the capacity is
``ceil(B*T*K*c/E)``, a function of B, so the batch size is fixed at export (``batch_size``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..io import atomic_path
from ..moe import iter_moe_mlps
from ..moe.checks import check_positive_int

__all__ = ["export_onnx", "input_shape", "tokens_per_image", "batch_can_be_dynamic", "MIN_OPSET", "OnnxExportError"]

MIN_OPSET = 18
_UNSET: Any = object()


class OnnxExportError(ValueError):
    """A model (or one of its MoE blocks) that cannot be expressed in ONNX; the message names the block."""


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if _missing(name)]
    if missing:
        raise ImportError(f"ONNX export needs {missing}: pip install -e \".[onnx]\" (onnx, onnxscript, onnxruntime)")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a timm ViT takes."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}: ONNX export takes a timm "
                         "VisionTransformer (with patch_embed)")
    h, w = embed.img_size
    return int(embed.proj.in_channels), int(h), int(w)


def tokens_per_image(model: nn.Module) -> int:
    """T: patches plus prefix tokens of a timm ViT."""
    return int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 0))


def batch_can_be_dynamic(model: nn.Module, tokens: int) -> tuple[bool, str]:
    """(True, "") when no MoE block's shapes depend on the batch size, else (False, why)."""
    for name, block in iter_moe_mlps(model):
        per_image = tokens * int(getattr(block, "ensemble_size", 1))
        size = block.settings.group_size
        if size is None:
            if block.capacity(per_image, training=False) is not None:  # (no capacity: Soft MoE groups per image)
                return False, (f"{name} routes the whole batch as one group (group_size=None), so its capacity "
                               "depends on the batch size")
        elif per_image % size:
            return False, (f"{name} has group_size={size}, which does not divide the {per_image} tokens one image "
                           "brings to it")
    return True, ""


@contextlib.contextmanager
def _export_settings(model: nn.Module, eval_capacity_factor: float | None, batch_priority: bool | None,
                     group_size: Any) -> Iterator[None]:
    """Eval mode, static dispatch and the chosen routing settings inside the ``with``; all restored after.

    group_size is set directly (not through set_routing), since None is a value here: the whole batch."""
    layers = [(name, block) for name, block in iter_moe_mlps(model)]
    for name, block in layers:
        if getattr(block, "expert_parallel", None) is not None:
            raise OnnxExportError(f"{name} shards its experts over ranks (expert parallelism); gather the model "
                                  "into one process (load its checkpoint without the expert-parallel strategy) "
                                  "before exporting")
    changes: dict[str, Any] = {name: value for name, value in (("eval_capacity_factor", eval_capacity_factor),
                                                               ("batch_priority", batch_priority)) if value is not None}
    if group_size is not _UNSET:
        check_positive_int("group_size", group_size, optional=True, what=" (the whole batch)")
        for name, block in layers:
            members = int(getattr(block, "ensemble_size", 1))
            if group_size is not None and group_size % members:
                raise ValueError(f"group_size={group_size} must be a multiple of {name}'s ensemble_size={members} "
                                 "(its routing rows are tokens x members)")
        changes["group_size"] = group_size
    new = [block.settings.replace(**changes) for _, block in layers]
    for (_, block), settings in zip(layers, new):  # every block checked before any changes
        block.check_settings(settings)
    was_training = model.training
    saved = [(block.settings, getattr(block, "dispatch", None)) for _, block in layers]
    try:
        model.eval()
        for (_, block), settings in zip(layers, new):
            block.settings = settings
            if hasattr(block, "dispatch"):
                block.dispatch = "static"
        yield
    finally:
        for (_, block), (settings, dispatch) in zip(layers, saved):
            block.settings = settings
            if dispatch is not None:
                block.dispatch = dispatch
        model.train(was_training)


def _failing_block(model: nn.Module, x: torch.Tensor, opset: int) -> str | None:
    """Name, router and cause of the first MoE block that does not export on its own, or None."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [block.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args[0]))
             for name, block in iter_moe_mlps(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    blocks = dict(iter_moe_mlps(model))
    for name, block_input in inputs.items():
        try:
            torch.onnx.export(blocks[name], (block_input,), dynamo=True, opset_version=opset, verbose=False)
        except Exception as err:  # noqa: BLE001 - any failure of the block is what the user needs to see
            router = type(getattr(blocks[name], "router", None) or blocks[name]).__name__
            return f"{name} (router {router}): {_root_cause(err)}"
    return None


def _root_cause(err: BaseException) -> str:
    """First line of the innermost exception (the exporter wraps the missing-operator message twice)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def export_onnx(model: nn.Module, path: str | os.PathLike, *, eval_capacity_factor: float | None = None,
                batch_priority: bool | None = None, group_size: int | None = _UNSET, batch_size: int = 1,
                dynamic_batch: bool | None = None, opset: int = MIN_OPSET, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (images [B, C, H, W] -> its output) as an ONNX file at ``path`` (atomically).

    eval_capacity_factor, batch_priority, group_size: the routing settings frozen into the graph (None /
    unset: the model's own); the model itself is left as it was. dynamic_batch: None = dynamic when the
    capacity arithmetic allows it (see the module doc), True = require it, False = fixed ``batch_size``.
    The routing settings, input size and ``metadata`` go into the model's metadata_props (JSON values).
    Raises OnnxExportError naming the MoE block (and router) that cannot be exported.
    """
    _require_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (the static dispatch needs ScatterElements "
                         f"with reduction), got {opset!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    shape = input_shape(model)
    with _export_settings(model, eval_capacity_factor, batch_priority, group_size):
        dynamic_ok, why = batch_can_be_dynamic(model, tokens_per_image(model))
        if dynamic_batch and not dynamic_ok:
            raise ValueError(f"dynamic_batch=True is not possible: {why}; set group_size to a divisor of the "
                             "tokens per image, or export a fixed batch_size")
        dynamic = dynamic_ok if dynamic_batch is None else dynamic_batch
        param = next(model.parameters())
        # torch.export specializes a dimension whose example size is 0 or 1: trace a dynamic batch with 2.
        x = torch.randn(max(batch_size, 2) if dynamic else batch_size, *shape, device=param.device, dtype=param.dtype)
        dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                        input_names=["images"], output_names=["output"], verbose=False)
        except Exception as err:
            culprit = _failing_block(model, x, opset)
            if culprit is None:
                raise
            raise OnnxExportError(f"cannot export to ONNX: MoE block {culprit}. Routers that export: "
                                  f"{_exportable_routers()}") from err
        batch_dim = program.model_proto.graph.input[0].type.tensor_type.shape.dim[0]
        if dynamic and not batch_dim.dim_param:
            raise OnnxExportError(f"the exported graph has a fixed batch of {batch_dim.dim_value} although a dynamic "
                                  "batch was asked for; export with dynamic_batch=False and a batch_size")
        props = {"input_size": list(shape), "dynamic_batch": dynamic, "batch_size": None if dynamic else batch_size,
                 "opset": opset, **_routing_metadata(model), **(metadata or {})}
    proto = program.model_proto
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    import onnx

    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(path)


def _routing_metadata(model: nn.Module) -> dict[str, Any]:
    """The routing settings of the first MoE block (set_routing keeps them equal across blocks)."""
    for _, block in iter_moe_mlps(model):
        settings = block.settings
        return {"eval_capacity_factor": settings.factor(training=False), "batch_priority": settings.batch_priority,
                "group_size": settings.group_size}
    return {}


def _exportable_routers() -> list[str]:
    """The built-in routers (tests/test_onnx_export.py exports each of them)."""
    from ..moe.routers import ROUTERS

    return sorted(name for name, cls in ROUTERS.items() if cls.__module__.startswith("vmoe.moe.routers"))
