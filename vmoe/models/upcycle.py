"""Sparse upcycling: start a V-MoE from a dense ViT (Komatsuzaki et al. 2022).

Every expert of an MoE block starts as a copy of that block's dense MLP (plus optional noise), the router
starts small so the first steps route almost uniformly, and every other tensor is copied; timm's ViT
checkpoint filter converts foreign formats and resamples patch/position embeddings, the head is reset
when the class count differs.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ..moe import iter_moe_layers
from .checkpoint import extract_state_dict, read_state_dict

__all__ = ["upcycle_state_dict", "upcycle", "EXPERT_FROM_DENSE"]

_log = logging.getLogger(__name__)
# Stacked expert tensor name -> dense timm Mlp tensor it copies (SPEC 6: nn.Linear layout per expert).
EXPERT_FROM_DENSE = {"experts.fc1_weight": "fc1.weight", "experts.fc1_bias": "fc1.bias",
                     "experts.fc2_weight": "fc2.weight", "experts.fc2_bias": "fc2.bias"}
_RESIDUAL = "residual.mlp."  # DeepSpeed-MoE residual block: a dense Mlp beside the experts
_CKPT_SUFFIXES = {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}
_MOE_ARG_NAMES = {"moe_layers", "num_experts", "k", "capacity_factor", "eval_capacity_factor", "batch_priority",
                  "noise_std", "group_size", "router", "moe_kwargs"}


# Tensors timm's checkpoint filter resizes when the patch size or image size differs.
_RESAMPLED = ("patch_embed.proj.weight", "pos_embed")


def _log_resampled(before: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor], model: nn.Module) -> None:
    """Say (logging WARNING, named after the sizes) which embeddings timm resampled to fit ``model``."""
    for key, shape in before.items():
        after = tuple(state[key].shape) if key in state else None
        if after is not None and after != shape:
            what = (f"patch size {shape[-2:]} -> {after[-2:]}" if key == "patch_embed.proj.weight"
                    else f"{shape[-2]} -> {after[-2]} positions (image size {tuple(model.patch_embed.img_size)})")
            _log.warning("upcycling: resampled %s from %s to %s (%s)", key, shape, after, what)


def _classifier_keys(model: nn.Module) -> set[str]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{name}.{p}" for name in names for p in ("weight", "bias")}


def _noisy_copies(dense: Tensor, num: int, noise: float, generator: torch.Generator | None) -> Tensor:
    """[E, *dense.shape]: E copies of ``dense``, each plus N(0, (noise * std(dense))^2) when noise > 0."""
    out = dense.detach().unsqueeze(0).expand(num, *dense.shape).clone()
    if noise > 0 and dense.numel() > 1:
        eps = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device)
        out += (noise * dense.detach().float().std() * eps).to(out.dtype)
    return out


def upcycle_state_dict(
    dense: Mapping[str, Tensor],
    model: nn.Module,
    *,
    expert_noise: float = 0.0,
    router_init_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """A full state dict for the V-MoE ``model`` built from a dense ViT's state dict.

    MoE block at ``p`` (e.g. "blocks.1.mlp"): ``p.experts.fc1_weight`` [E, H, D] = E copies of the
    dense ``p.fc1.weight`` [H, D] (likewise fc1 bias, fc2 weight [E, D, H], fc2 bias), each plus
    N(0, (expert_noise * std)^2); a residual MoE's fixed ``p.residual.mlp`` copies the dense MLP;
    ``p.router.weight`` [E, D] ~ N(0, router_init_std^2) (0 gives all-equal
    gates); other tensors of the MoE block keep the model's fresh values. Every other tensor is copied,
    except that a classifier of a different size keeps the model's fresh one (head reset) and the patch
    embedding is adapted to the model's in_chans. Raises ValueError listing every missing, unexpected or
    mismatched key.
    """
    if expert_noise < 0 or router_init_std < 0:
        raise ValueError(f"expert_noise and router_init_std must be >= 0, got {expert_noise}, {router_init_std}")
    state = extract_state_dict(dense)
    if isinstance(model, VisionTransformer):
        before = {key: tuple(state[key].shape) for key in _RESAMPLED if key in state}
        state = checkpoint_filter_fn(state, model)  # foreign layouts, patch/pos-embed resampling
        _log_resampled(before, state, model)
    target = model.state_dict()
    heads = _classifier_keys(model)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    moe_prefixes = [name + "." for name, _ in iter_moe_layers(model)]
    for key, fresh in target.items():
        prefix = next((p for p in moe_prefixes if key.startswith(p)), None)
        if prefix is not None:
            local = key[len(prefix):]
            if local.startswith(_RESIDUAL):  # residual MoE: its fixed MLP is the dense one
                source = prefix + local[len(_RESIDUAL):]
                if source not in state or tuple(state[source].shape) != tuple(fresh.shape):
                    mismatched.append(f"{source} {tuple(state[source].shape) if source in state else 'absent'} "
                                      f"for {key} {tuple(fresh.shape)}")
                else:
                    out[key] = state[source]
                    used.add(source)
            elif local in EXPERT_FROM_DENSE:
                source = prefix + EXPERT_FROM_DENSE[local]
                if source not in state:
                    missing.append(f"{source} (for {key})")
                elif tuple(state[source].shape) != tuple(fresh.shape[1:]):
                    mismatched.append(f"{source} {tuple(state[source].shape)} vs expert {tuple(fresh.shape[1:])}")
                else:
                    out[key] = _noisy_copies(state[source], fresh.shape[0], expert_noise, generator)
                    used.add(source)
            elif local == "router.weight":
                out[key] = torch.randn(fresh.shape, generator=generator).to(fresh) * router_init_std
            else:  # scheme-specific state (e.g. balancing biases) starts as the model initialised it
                out[key] = fresh
                _log.info("upcycling: %s keeps its fresh initial value", key)
            continue
        if key not in state:
            if key in heads:  # the dense weights have no classifier: the model's new head stays
                out[key] = fresh
            else:
                missing.append(key)
            continue
        value = state[key]
        used.add(key)
        if tuple(value.shape) == tuple(fresh.shape):
            out[key] = value
        elif key in heads:
            out[key] = fresh
            _log.info("upcycling: %s reset (checkpoint %s, model %s)", key, tuple(value.shape), tuple(fresh.shape))
        elif (key == "patch_embed.proj.weight" and value.shape[0] == fresh.shape[0]
              and value.shape[2:] == fresh.shape[2:]):  # only in_chans differs
            out[key] = adapt_input_conv(fresh.shape[1], value, base_chans=value.shape[1])
        else:
            mismatched.append(f"{key} checkpoint {tuple(value.shape)} vs model {tuple(fresh.shape)}")
    # A dense classifier the model does not have (num_classes=0) is dropped like a reset head.
    unexpected = sorted(key for key in set(state) - used if key not in heads)
    if missing or unexpected or mismatched:
        raise ValueError("\n".join(
            [f"cannot upcycle: the dense weights do not fit the V-MoE ({len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mismatched)} mismatched)"]
            + [f"  missing:    {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected]
            + [f"  mismatched: {k}" for k in mismatched]
            + ["  (is the dense model the same architecture as the V-MoE backbone? V-MoE weights load with "
               "vmoe.models.load_weights)"]))
    return out


def _is_checkpoint_path(source: Any) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return isinstance(source, str) and (Path(source).suffix in _CKPT_SUFFIXES or Path(source).is_file())


def upcycle(
    source: str | os.PathLike | nn.Module,
    backbone: str | None = None,
    *,
    expert_noise: float = 0.0,
    router_init_std: float = 0.01,
    generator: torch.Generator | None = None,
    weights_only: bool = True,
    **kwargs,
) -> nn.Module:
    """A V-MoE upcycled from a dense ViT given as

    - a timm pretrained name ("vit_small_patch16_224.augreg_in21k_ft_in1k"): timm downloads/loads it;
    - a checkpoint file (.safetensors, .pth/.pt/.bin, timm or Lightning .ckpt) with ``backbone`` naming
      the timm architecture it was saved from;
    - a dense timm VisionTransformer instance (left unchanged; the V-MoE is a modified copy).

    ``kwargs``: :func:`create_vmoe` arguments (moe_layers, num_experts, k, ...) and timm kwargs
    (img_size, num_classes, ...; for an instance only img_size and num_classes can change).
    """
    from .build import convert_to_moe, create_vmoe

    up = dict(expert_noise=expert_noise, router_init_std=router_init_std, generator=generator)
    if isinstance(source, nn.Module):
        moe_args = {key: kwargs.pop(key) for key in list(kwargs) if key in _MOE_ARG_NAMES}
        other = sorted(set(kwargs) - {"img_size", "num_classes"})
        if other or backbone is not None:
            raise ValueError(f"upcycling a model instance can change only img_size and num_classes; got "
                             f"{other + (['backbone'] if backbone is not None else [])} (to change the "
                             "architecture, save the dense weights and upcycle the file with a backbone name)")
        dense_state = source.state_dict()
        model = copy.deepcopy(source)
        if "img_size" in kwargs:
            model.set_input_size(img_size=kwargs["img_size"])
        if "num_classes" in kwargs:
            model.reset_classifier(kwargs["num_classes"])
        convert_to_moe(model, **moe_args)
        model.load_state_dict(upcycle_state_dict(dense_state, model, **up))
        return model
    if _is_checkpoint_path(source):
        if backbone is None:
            raise ValueError(f"upcycling the file {os.fspath(source)!r} needs backbone=<the timm architecture "
                             "it was saved from>, e.g. backbone='vit_small_patch16_224'")
        state = read_state_dict(source, weights_only=weights_only)
        model = create_vmoe(backbone, **kwargs)
        model.load_state_dict(upcycle_state_dict(state, model, **up))
        return model
    if not isinstance(source, str):
        raise ValueError(f"source must be a timm model name, a checkpoint path or an nn.Module, got "
                         f"{type(source).__name__}")
    if backbone is not None and backbone != source:
        raise ValueError(f"source={source!r} is a timm name; backbone={backbone!r} would contradict it")
    arch = source.split(".")[0]
    if not (timm.is_model(arch) or source.startswith(("hf-hub:", "hf_hub:", "local-dir:"))):
        raise ValueError(f"{source!r} is neither an existing checkpoint file nor a timm model name")
    return create_vmoe(source, pretrained=True, upcycle_kwargs=up, **kwargs)
