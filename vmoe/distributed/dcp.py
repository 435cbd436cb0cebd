"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes only its own shards.

Layout of a checkpoint directory (``state_dict_type="sharded"`` of the expert-parallel strategies):

- DCP files (``.metadata`` + ``__<rank>_0.distcp``) holding ``{"state_dict": model, "optimizer_states":
  [optimizer, ...]}``. Expert tensors (parameters and their optimizer moments, leading axis E) are DTensors
  on a 2-D mesh ``(replica, expert)`` = (W/P, P) with placements ``(Replicate(), Shard(0))``: each expert
  slice is written once, by one of the ranks holding it, with its offset on the E axis. Dense tensors are
  FSDP2's DTensor shards (FSDP strategy) or plain replicated tensors that DCP writes once (DDP strategy).
  Optimizer states are keyed by parameter name (``torch.distributed.checkpoint.state_dict`` format), so they
  do not depend on the number of ranks.
- ``meta.pt``: everything else of the Lightning checkpoint (loops, callbacks, hyper-parameters, schedulers),
  written by global rank 0.

Loading builds the same structure from the current model (its own world size and expert-parallel size) and
lets DCP read the slices each rank needs, so 2 ranks -> 4 ranks -> 1 process works with no gathering.
:func:`dcp_to_checkpoint` turns a directory into one ordinary Lightning ``.ckpt`` file (full tensors,
``optimizer.state_dict()`` layout) for ``vmoe test`` / ``vmoe export`` / a plain one-process resume.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..io_folder import new_temp_folder, replace_folder
from .groups import ExpertParallelGroups
from .shard import expert_parameter_names

__all__ = ["META_FILE", "is_sharded_checkpoint", "expert_mesh", "sharded_model_state", "sharded_optimizer_state",
           "save_sharded_checkpoint", "load_sharded_checkpoint", "dcp_to_checkpoint"]

META_FILE = "meta.pt"
TENSOR_KEYS = ("state_dict", "optimizer_states")


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_sharded_checkpoint` (DCP metadata + meta.pt)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META_FILE).is_file()


def expert_mesh(groups: ExpertParallelGroups, device_type: str) -> DeviceMesh:
    """The (replica, expert) mesh of the layout: rank ``i*P + j`` at [i, j], as in ``new_expert_parallel_groups``
    (collective: every rank calls it)."""
    return init_device_mesh(device_type, (groups.num_replicas, groups.ep_size), mesh_dim_names=("replica", "expert"))


def _as_expert_dtensor(local: Tensor, mesh: DeviceMesh) -> DTensor:
    # The local slice [E/P, ...] as the global [E, ...] tensor: sharded on E inside a group, the same slice
    # on every replica (DCP writes one copy of each slice).
    return DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False)


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) and value.device_mesh.mesh_dim_names == (
        "replica", "expert") else value


def sharded_model_state(module: nn.Module, mesh: DeviceMesh | None) -> dict[str, Any]:
    """``module.state_dict()`` with every expert tensor [E/P, ...] as a DTensor [E, ...] on ``mesh``
    (FSDP2's dense DTensors and plain tensors as they are). Shares storage with the parameters."""
    state = module.state_dict()
    for key in expert_parameter_names(module):
        state[key] = _as_expert_dtensor(state[key], mesh)
    return state


def sharded_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh | None, *,
                            initialise: bool = False) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (``get_optimizer_state_dict``), expert moments as DTensors
    on ``mesh``. An optimizer that has not stepped has no state and is saved as such (its param groups), unless
    ``initialise``: a load target, which ``get_optimizer_state_dict`` fills with the zeros of a zero-lr step
    that the load then overwrites (never done on save: it would count a step Adam did not take)."""
    if not optimizer.state and not initialise:
        names = {id(p): n for n, p in module.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        return {"state": {}, "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                              for g in optimizer.state_dict()["param_groups"]]}
    state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=False))
    experts = expert_parameter_names(module)
    params = dict(module.named_parameters())
    for key, entry in state["state"].items():
        if key in experts:
            shape = params[key].shape
            state["state"][key] = {k: _as_expert_dtensor(v, mesh) if torch.is_tensor(v) and v.shape == shape else v
                                   for k, v in entry.items()}
    return state


def _broadcast_object(value: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a Lightning checkpoint dict whose ``state_dict`` / ``optimizer_states`` come from
    :func:`sharded_model_state` / :func:`sharded_optimizer_state` as a DCP directory at ``path`` (collective).

    Atomic: everything goes to a hidden sibling directory, renamed over ``path`` once every rank has written;
    an existing checkpoint at ``path`` (file or directory) is replaced only then.
    """
    if "current_model_state" in checkpoint:
        raise ValueError("sharded checkpoints do not support EMAWeightAveraging (its current_model_state is a "
                         "plain state dict holding one rank's experts); use state_dict_type='full'")
    path = Path(path)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    tmp = Path(_broadcast_object(str(new_temp_folder(path)) if rank == 0 else None))
    try:
        tensors = {k: checkpoint[k] for k in TENSOR_KEYS if k in checkpoint}
        dcp.save(tensors, checkpoint_id=tmp)  # collective: plans are gathered and deduplicated on rank 0
        if rank == 0:
            torch.save({k: v for k, v in checkpoint.items() if k not in TENSOR_KEYS}, tmp / META_FILE)
            replace_folder(tmp, path, keep_others=False)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # nobody reads the checkpoint before rank 0 has renamed it
    return path


def load_sharded_checkpoint(path: str | os.PathLike, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                            mesh: DeviceMesh | None, *, strict: bool = True) -> dict[str, Any]:
    """Read a directory of :func:`save_sharded_checkpoint` into ``module`` (and ``optimizers``, when given) in
    their current layout, whatever the world size and expert-parallel size that wrote it (collective).
    Returns the rest of the checkpoint (meta.pt: loops, callbacks, schedulers, hyper-parameters)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint directory (expected .metadata and {META_FILE})")
    meta = torch.load(path / META_FILE, weights_only=False, map_location="cpu")
    target: dict[str, Any] = {"state_dict": sharded_model_state(module, mesh)}
    if optimizers:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        if not any(key.startswith("optimizer_states.") for key in stored):
            raise KeyError(f"{path} holds no optimizer state (saved with weights only?); cannot resume training")
        # an optimizer saved before its first step has param groups only
        target["optimizer_states"] = [
            sharded_optimizer_state(module, opt, mesh, initialise=any(k.startswith(f"optimizer_states.{i}.state.")
                                                                      for k in stored))
            for i, opt in enumerate(optimizers)]
    # Reads in place into the tensors of target; the DTensors' local parts are this rank's slices.
    dcp.load(target, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=not strict))
    model_state = {k: _local(v) for k, v in target["state_dict"].items()}
    module.load_state_dict(model_state, strict=strict)
    for opt, state in zip(optimizers, target.get("optimizer_states", [])):
        state = {**state, "state": {k: {n: _local(v) for n, v in entry.items()} for k, entry in state["state"].items()}}
        set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=False))
    return meta


def _native_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (``get_optimizer_state_dict``) in ``optimizer.state_dict()``'s layout:
    parameters numbered in param-group order."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        names = group["params"]
        for name in names:
            index[name] = len(index)
        groups.append({**group, "params": [index[n] for n in names]})
    entries = state.get("state", {})  # DCP stores no empty dict: an optimizer saved before its first step
    unknown = sorted(set(entries) - set(index))
    if unknown:
        raise ValueError(f"optimizer state for parameters outside every param group: {unknown[:5]}")
    return {"state": {index[name]: dict(entry) for name, entry in entries.items()}, "param_groups": groups}


def dcp_to_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """One Lightning ``.ckpt`` file (full tensors, the layout of a one-process ``vmoe fit`` checkpoint) from a
    sharded checkpoint directory; no process group needed. Written atomically."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ..io import atomic_path

    src, dst = Path(src), Path(dst)
    if not is_sharded_checkpoint(src):
        raise FileNotFoundError(f"{src} is not a sharded checkpoint directory (expected .metadata and {META_FILE}, "
                                "as written by an expert-parallel strategy with state_dict_type='sharded')")
    if dst.resolve() == src.resolve() or dst.is_dir():
        raise ValueError(f"destination {dst} must be a file path outside the checkpoint directory {src}")
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as scratch:
        flat = Path(scratch) / "full.pt"
        dcp_to_torch_save(src, flat)
        tensors = torch.load(flat, weights_only=False, map_location="cpu")
    checkpoint = torch.load(src / META_FILE, weights_only=False, map_location="cpu")
    checkpoint["state_dict"] = dict(tensors["state_dict"])
    if "optimizer_states" in tensors:
        checkpoint["optimizer_states"] = [_native_optimizer_state(s) for s in tensors["optimizer_states"]]
    with atomic_path(dst) as tmp:
        torch.save(checkpoint, tmp)
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    """``vmoe consolidate SRC_DIR DST.ckpt`` (also ``python -m vmoe.distributed.dcp``): :func:`dcp_to_checkpoint`."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="vmoe consolidate", description=dcp_to_checkpoint.__doc__)
    parser.add_argument("src", type=str, help="sharded checkpoint directory (state_dict_type='sharded')")
    parser.add_argument("dst", type=str, help="the .ckpt file to write")
    args = parser.parse_args(list(argv) if argv is not None else None)
    with contextlib.suppress(BrokenPipeError):
        print(dcp_to_checkpoint(args.src, args.dst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
