"""Rebuild a JAX V-MoE / E³ checkpoint as a timm model here that computes what the reference computes."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch import nn

from ...moe.settings import V_MOE_CAPACITY_FACTOR
from ..build import create_vmoe
from ..checkpoint import load_weights
from .architecture import ReferenceArchitecture, infer_architecture
from .convert import reference_state_dict
from .reader import read_reference_checkpoint, resolve_checkpoint_prefix

__all__ = ["load_reference", "build_reference_model", "reference_model_config"]

BACKBONE = "vmoe_vit_prelogits"


def reference_model_config(arch: ReferenceArchitecture, *, k: int | None = None, group_size: int | None = None,
                           capacity_factor: float = V_MOE_CAPACITY_FACTOR, eval_capacity_factor: float | None = None,
                           batch_priority: bool = False, bfloat16_dispatch: bool = False,
                           noise_std: float = 1.0) -> dict[str, Any]:
    """``create_vmoe`` keyword arguments building the model of ``arch`` with these routing settings.

    k: None = 2 for a V-MoE, 1 for E³ (the released checkpoints' values). group_size: routing rows per
    group (tokens, times M for E³), as the reference's configs set it; None = the whole batch.
    """
    ensemble = arch.ensemble_size > 1
    moe_kwargs: dict[str, Any] = {}
    if ensemble:
        moe_kwargs["ensemble_size"] = arch.ensemble_size
    experts = arch.num_experts[0] if len(set(arch.num_experts)) == 1 else list(arch.num_experts)
    return dict(backbone=BACKBONE, moe_layers=list(arch.moe_layers), num_experts=experts,
                k=k if k is not None else (1 if ensemble else 2), capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority, noise_std=noise_std,
                group_size=group_size, bfloat16_dispatch=bfloat16_dispatch, router="ensemble" if ensemble else "vmoe", moe_kwargs=moe_kwargs or None,
                **arch.timm_kwargs())


_E3_NAME = re.compile(r"(^|[^a-z0-9])(eee|e3)_", re.IGNORECASE)


def says_ensemble(name: str | os.PathLike | None) -> bool:
    """True when a checkpoint's file name says E³ (the released ones are called ``eee_*``)."""
    return name is not None and bool(_E3_NAME.search(Path(name).name))


def build_reference_model(arrays: Mapping[str, np.ndarray], *, ensemble_size: int | None = None,
                          name: str | os.PathLike | None = None, **routing: Any) -> nn.Module:
    """The timm V-MoE (or E³) model of a reference params tree, with its weights, in eval mode.

    ensemble_size: only for an E³ tree whose router kernels are stored flat [D, E] (as the upstream E³
    checkpoint before its fine-tuning reshape); a 3-D router kernel [D, M, E/M] already says M. A flat tree
    whose ``name`` (the checkpoint's prefix) says E³ (``eee_*``) needs it: ``ensemble_size=1`` loads it as a
    plain V-MoE on purpose.
    """
    arch = infer_architecture(arrays)
    if ensemble_size is None and arch.ensemble_size == 1 and says_ensemble(name):
        raise ValueError(f"{Path(name).name} is named like an E³ checkpoint but its router kernels are stored flat "
                         f"[D, E]: pass ensemble_size=M (the released E³ models have M=2; --ensemble_size 2 for "
                         "vmoe convert), or ensemble_size=1 to load it as a plain V-MoE")
    if ensemble_size is not None and ensemble_size != arch.ensemble_size:
        if arch.ensemble_size != 1:
            raise ValueError(f"the checkpoint's router kernels say ensemble_size={arch.ensemble_size}, "
                             f"got ensemble_size={ensemble_size}")
        arch = ReferenceArchitecture(**{**arch.__dict__, "ensemble_size": ensemble_size})
    model = create_vmoe(**reference_model_config(arch, **routing))
    load_weights(model, reference_state_dict(arrays, arch))
    model.reference_architecture = arch
    return model.eval()


def load_reference(prefix: str | os.PathLike, *, k: int | None = None, group_size: int | None = None,
                   capacity_factor: float = V_MOE_CAPACITY_FACTOR, eval_capacity_factor: float | None = None,
                   batch_priority: bool = False, bfloat16_dispatch: bool = False,
                   ensemble_size: int | None = None) -> nn.Module:
    """A released V-MoE / E³ checkpoint (``<prefix>.index`` + ``<prefix>.data-*``) as a timm model.

    The architecture comes from the arrays (see :func:`infer_architecture`); the routing settings are
    arguments because the checkpoint does not store them: K (None: 2, or 1 for E³), ``group_size`` in
    routing rows as in the reference config (e.g. 8 images x tokens), capacity factors, Batch Priority
    Routing and ``bfloat16_dispatch`` (the reference configs' ``dispatcher.bfloat16 = True``). The model
    is in eval mode (no router noise): x [B, C, H, W] -> logits [B, N] (E³: log of the members' mean
    softmax, and ``forward_members`` -> [B, M, N]). ``prefix``: the checkpoint prefix, its ``.index`` file
    or the folder holding it.
    """
    prefix = resolve_checkpoint_prefix(prefix)
    return build_reference_model(read_reference_checkpoint(prefix), name=prefix, k=k, group_size=group_size,
                                 capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                                 batch_priority=batch_priority, bfloat16_dispatch=bfloat16_dispatch,
                                 ensemble_size=ensemble_size)
