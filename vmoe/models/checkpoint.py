"""Read network weights from the checkpoint formats users have, save V-MoE weights, load them strictly."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..io import atomic_path

__all__ = ["read_state_dict", "extract_state_dict", "check_state_dict", "save_weights", "load_weights"]

_log = logging.getLogger(__name__)
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
# Wrappers that prefix every key: DDP/DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The LightningModule attribute that holds the network (vmoe.train.module.ImageClassifier.model).
LIGHTNING_PREFIX = "model."


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in state.items()}


def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The network's state dict from a loaded checkpoint object.

    Accepts a bare state dict, a timm/torchvision-style dict holding it under "state_dict" or "model",
    or a Lightning checkpoint (its "state_dict" keys of the network start with "model."; keys of other
    LightningModule attributes are left out). DDP "module." and torch.compile "_orig_mod." prefixes are
    removed.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    is_lightning = "pytorch-lightning_version" in obj or "lightning_version" in obj
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = dict(obj)
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, Tensor))
    if not_tensors or not state:
        raise ValueError(f"the checkpoint holds no state dict (keys that are not tensors: {not_tensors[:10]}; "
                         "expected a state dict, or a dict with it under 'state_dict' or 'model')")
    network = [key for key in state if key.startswith(LIGHTNING_PREFIX)]
    if network and (is_lightning or len(network) == len(state)):
        left_out = sorted(set(state) - set(network))
        if left_out:
            _log.info("Lightning checkpoint: keeping the '%s' network, leaving out %s", LIGHTNING_PREFIX, left_out)
        state = _strip({key: state[key] for key in network}, LIGHTNING_PREFIX)
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = _strip(state, prefix)
    return state


def read_state_dict(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, Tensor]:
    """The network's state dict stored in a .safetensors or torch (.pth/.pt/.bin/.ckpt) file, on CPU.

    weights_only=True refuses pickled Python objects other than tensors and plain containers; pass False
    only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return extract_state_dict(load_file(str(path), device="cpu"))
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"unknown checkpoint suffix {path.suffix!r} for {path}; valid: .safetensors, "
                         f"{', '.join(sorted(_TORCH_SUFFIXES))}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds Python objects that weights_only loading refuses ({err}); if you "
                         "trust the file, pass weights_only=False") from err
    return extract_state_dict(obj)


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raise ValueError listing every missing, unexpected and shape-mismatched key of ``state`` against
    ``model``; return quietly when ``state`` fits the model exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(key for key in set(own) & set(state) if tuple(own[key].shape) != tuple(state[key].shape))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"the weights do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} shape-mismatched keys); nothing was loaded"]
    lines += [f"  missing:    {key} {tuple(own[key].shape)}" for key in missing]
    lines += [f"  unexpected: {key} {tuple(state[key].shape)}" for key in unexpected]
    lines += [f"  mismatched: {key} checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
              for key in mismatched]
    if any(".experts." in key for key in missing) and not any(".experts." in key for key in state):
        lines.append("  (these look like dense ViT weights: use vmoe.models.upcycle to start a V-MoE from them)")
    elif any(".experts." in key or ".mlp.fc" in key for key in missing + unexpected):
        lines.append("  (the MoE placement differs: compare the blocks whose mlp keys are missing/unexpected)")
    if any(".experts." in key or ".router." in key for key in mismatched):
        lines.append("  (expert tensors are [E, ...]: the expert count or width differs)")
    raise ValueError("\n".join(lines))


def save_weights(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict to ``path`` atomically (temporary file, then rename).

    .safetensors (recommended) or .pth/.pt; returns the path.
    """
    path = Path(path)
    if path.suffix not in {".safetensors", ".pth", ".pt"}:
        raise ValueError(f"save_weights writes .safetensors, .pth or .pt files, got {path}")
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(state, tmp, metadata={"format": "pt", **(metadata or {})})
        else:
            torch.save(state, tmp)
    return path


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], *,
                 weights_only: bool = True) -> nn.Module:
    """Copy weights from a file (see :func:`read_state_dict`) or a state dict into ``model``.

    Every key and shape is checked before anything is copied: on any mismatch (expert count, width,
    MoE placement, ...) a ValueError lists the keys and the model is left unchanged. Returns ``model``.
    """
    state = (extract_state_dict(source) if isinstance(source, Mapping)
             else read_state_dict(source, weights_only=weights_only))
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model
