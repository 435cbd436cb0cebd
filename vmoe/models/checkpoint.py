"""Read network weights from the checkpoint formats users have, save V-MoE weights, load them strictly."""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..io import atomic_path

__all__ = ["holds_experts", "read_checkpoint", "read_state_dict", "extract_state_dict", "check_state_dict",
           "check_finite_weights", "save_weights", "load_weights"]

_log = logging.getLogger(__name__)
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
# Wrappers that prefix every key: DDP/DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The LightningModule attribute that holds the network (vmoe.train.module.ImageClassifier.model).
LIGHTNING_PREFIX = "model."


def holds_experts(keys: Iterable[str]) -> bool:
    """True for V-MoE weights: some key (of a state dict, or a list of keys) names an expert tensor
    (``blocks.i.mlp.experts.*``). The one test of "V-MoE or dense weights?" (see :mod:`.starting_weights`)."""
    return any(".experts." in key for key in keys)


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


def _file_error(path: Path, cause: str) -> ValueError:
    size = path.stat().st_size
    return ValueError(f"cannot read the checkpoint {path} ({size:,} bytes): {cause}")


def _check_safetensors_header(path: Path, size: int) -> None:
    """Catch a truncated .safetensors file by its header (8-byte length, JSON with each tensor's byte range)."""
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = f.read(header_len) if 0 <= header_len <= size else b""
    if len(head) < 8:
        raise _file_error(path, "a truncated .safetensors file (its 8-byte header length is cut off)")
    if 8 + header_len > size:
        raise _file_error(path, f"not a .safetensors file, or a truncated one: its header claims {header_len:,} "
                                f"bytes after the first 8, more than the file holds")
    try:
        entries = json.loads(header)
        data_end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise _file_error(path, f"not a .safetensors file: its header is not valid ({type(err).__name__})") from err
    if 8 + header_len + data_end > size:
        raise _file_error(path, f"a truncated .safetensors file: its header lists {data_end:,} bytes of tensor data, "
                                f"the file holds {size - 8 - header_len:,}")


def read_checkpoint(path: str | os.PathLike, *, weights_only: bool = True) -> Any:
    """The object stored in a checkpoint file (.safetensors: a dict of tensors; torch files: whatever was
    saved), on CPU. The one reader of every vmoe command: an error names the file and the cause (missing,
    empty, truncated, not a checkpoint at all, or pickled objects the safe loader refuses).

    weights_only=True refuses pickled Python objects other than tensors and plain containers; pass False
    only for files you trust.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if not path.is_file():
        raise ValueError(f"the checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise _file_error(path, "the file is empty (a save that was interrupted, or a copy that failed)")
    if path.suffix == ".safetensors":
        _check_safetensors_header(path, size)
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise _file_error(path, f"not a valid .safetensors file, it may be truncated or damaged ({err})") from err
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"unknown checkpoint suffix {path.suffix!r} for {path}; valid: .safetensors, "
                         f"{', '.join(sorted(_TORCH_SUFFIXES))}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        kind = "torch.save archive"
    elif magic[:1] == b"\x80":
        kind = "pickle"
    else:
        hint = " (it looks like a .safetensors file: rename it)" if _looks_like_safetensors(path, size) else ""
        raise _file_error(path, f"not a torch checkpoint: neither a torch.save zip archive nor a pickle (it starts "
                                f"with bytes {magic.hex(' ')}){hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a sound pickle that only the allow-list refuses
            raise _file_error(path, f"it holds Python objects that weights_only loading refuses ({_first_line(err)}); "
                                    "if you trust the file, pass weights_only=False") from err
        raise _file_error(path, f"the {kind} is damaged or truncated ({_first_line(err)})") from err
    except (RuntimeError, EOFError, IndexError, ValueError, KeyError, OSError) as err:
        raise _file_error(path, f"the {kind} is damaged or truncated ({type(err).__name__}: "
                                f"{_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    """The informative line of a torch.load error (its weights-only messages are paragraphs of advice)."""
    text = str(err).strip()
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        return match.group(1).strip()[:300]
    return text.splitlines()[0][:300] if text else type(err).__name__


def _looks_like_safetensors(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def read_state_dict(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, Tensor]:
    """The network's state dict stored in a .safetensors or torch (.pth/.pt/.bin/.ckpt) file, on CPU
    (see :func:`read_checkpoint` for the errors)."""
    obj = read_checkpoint(path, weights_only=weights_only)
    try:
        return extract_state_dict(obj)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def tensor_problem(value: Tensor, like: Tensor) -> str | None:
    """Why ``value`` cannot be copied into ``like`` (same shape assumed) without changing its meaning, or None:
    a sparse/mkldnn layout, the meta device (no data), another kind of dtype (integer/bool/complex for
    floating, ...), or NaN/inf values."""
    if not isinstance(value, Tensor):
        return f"not a tensor but {type(value).__name__}"
    if value.layout != torch.strided:
        return f"layout {value.layout} (only dense tensors load)"
    if value.is_meta:
        return "on the meta device (it holds no data)"
    if value.is_quantized:
        return "a quantized tensor"
    if _kind(value.dtype) != _kind(like.dtype):
        return f"dtype {value.dtype} where the model has {like.dtype}"
    if (value.is_floating_point() or value.is_complex()) and value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        return f"{bad} of {value.numel()} values are NaN or infinite"
    return None


def check_finite_weights(state: Mapping[str, Any], what: str, hint: str = "") -> None:
    """Raise ValueError when a floating tensor of ``state`` holds NaN or infinite values: the check
    :func:`load_weights` applies, for the writers (export, save_pretrained) and for resuming a training state,
    so that weights no loader would accept are neither written nor trained on. ``what`` names the source,
    ``hint`` (a line) says what to do instead."""
    bad = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()) and value.numel():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad[key] = f"{count} of {value.numel()} values are NaN or infinite"
    if bad:
        lines = [f"  {key}: {problem}" for key, problem in list(bad.items())[:10]]
        more = [f"  ... and {len(bad) - 10} more"] if len(bad) > 10 else []
        raise ValueError("\n".join([f"{what}: {len(bad)} of {len(state)} tensors hold NaN or infinite values "
                                     "(a diverged run?); refusing them"] + lines + more + ([hint] if hint else [])))


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raise ValueError listing every missing, unexpected, shape-mismatched and unusable key of ``state``
    against ``model`` (see :func:`tensor_problem`: layout, device, dtype kind, finiteness); return quietly
    when every tensor of ``state`` can be copied into the model, so a load that follows cannot fail half-way."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(key for key in set(own) & set(state) if tuple(own[key].shape) != tuple(state[key].shape))
    problems = {key: problem for key in sorted(set(own) & set(state)) if key not in mismatched
                for problem in [tensor_problem(state[key], own[key])] if problem is not None}
    if not (missing or unexpected or mismatched or problems):
        return
    lines = [f"the weights do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} shape-mismatched, {len(problems)} unusable keys); nothing was loaded"]
    lines += [f"  unusable:   {key}: {problem}" for key, problem in problems.items()]
    lines += [f"  missing:    {key} {tuple(own[key].shape)}" for key in missing]
    lines += [f"  unexpected: {key} {tuple(state[key].shape)}" for key in unexpected]
    lines += [f"  mismatched: {key} checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
              for key in mismatched]
    if holds_experts(missing) and not holds_experts(state):
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

    Every key, shape and tensor is checked before anything is copied (:func:`check_state_dict`): on any
    mismatch (expert count, width, MoE placement, a sparse, non-finite or wrongly typed tensor, ...) a
    ValueError lists the keys and the model is left unchanged. Returns ``model``.
    """
    state = (extract_state_dict(source) if isinstance(source, Mapping)
             else read_state_dict(source, weights_only=weights_only))
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model
