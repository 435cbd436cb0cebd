"""Build a V-MoE from a timm ViT: choose the MoE blocks, swap their dense MLPs for MoE blocks, and start
the weights from scratch, from a checkpoint or by upcycling a dense ViT (see docs/design.md)."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from timm.layers import Mlp
from torch import nn

from ..moe import MoEConfig, build_moe_mlp
from .checkpoint import load_weights, read_state_dict
from .ensemble import to_ensemble
from .naming import record_input_size, record_moe_args
from .starting_weights import holds_experts, starting_state_dict
from .upcycle_weights import upcycle_state_dict

__all__ = ["parse_moe_layers", "mlp_config", "convert_to_moe", "create_vmoe", "build_network", "upcycle"]

_CKPT_SUFFIXES = {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}


def _placement_help(depth: int) -> str:
    odd = len(range(1, depth, 2))
    return (f"valid for depth {depth}: 'every-n' with 1 <= n <= {depth}, 'last-n' with 1 <= n <= {odd}, "
            f"or a non-empty list of distinct block indices in [0, {depth - 1}]")


def parse_moe_layers(moe_layers: str | Sequence[int], depth: int) -> list[int]:
    """Block indices (sorted) that get an MoE block in a ViT of ``depth`` blocks.

    "every-n": ``range(n-1, depth, n)`` (every-2 = the odd blocks); "last-n": the last n odd blocks,
    ``range(1, depth, 2)[-n:]``; or an explicit list of indices. Raises ValueError on anything else,
    on an index out of range, a duplicate, or a choice that selects no block.
    """
    if isinstance(moe_layers, str):
        match = re.fullmatch(r"\s*(every|last)-(\d+)\s*", moe_layers)
        if match is None:
            raise ValueError(f"moe_layers={moe_layers!r} is not understood; {_placement_help(depth)}")
        kind, n = match.group(1), int(match.group(2))
        odd = list(range(1, depth, 2))
        if kind == "every" and 1 <= n <= depth:
            return list(range(n - 1, depth, n))
        if kind == "last" and 1 <= n <= len(odd):
            return odd[-n:]
        raise ValueError(f"moe_layers={moe_layers!r} selects no valid set of blocks; {_placement_help(depth)}")
    if isinstance(moe_layers, (list, tuple)):
        bad = [i for i in moe_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
        if bad or not moe_layers or len(set(moe_layers)) != len(moe_layers):
            reason = (f"bad indices {bad}" if bad else "empty list" if not moe_layers else "duplicate indices")
            raise ValueError(f"moe_layers={list(moe_layers)!r} is invalid ({reason}); {_placement_help(depth)}")
        return sorted(moe_layers)
    raise ValueError(f"moe_layers={moe_layers!r} has type {type(moe_layers).__name__}; {_placement_help(depth)}")


def _act_layer(act: nn.Module):
    """A zero-argument factory rebuilding ``act``: its class when that reproduces it (nn.GELU()), else a
    copier, so settings such as GELU(approximate='tanh') survive the swap."""
    cls = type(act)
    try:
        if repr(cls()) == repr(act):
            return cls
    except TypeError:  # the class needs constructor arguments
        pass
    return functools.partial(copy.deepcopy, act)


def mlp_config(mlp: nn.Module) -> dict[str, Any]:
    """The build_moe_mlp arguments (in/hidden/out features, act_layer, bias, drop) of a timm ``Mlp``.

    Raises ValueError for MLPs an MoE block cannot mirror (gated MLPs, conv MLPs, a hidden norm, or
    different bias/dropout settings on fc1 and fc2).
    """
    if not isinstance(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise ValueError(f"only timm.layers.Mlp with nn.Linear layers can become an MoE block; got "
                         f"{type(mlp).__name__} (fc1={type(getattr(mlp, 'fc1', None)).__name__})")
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError(f"an Mlp with a hidden norm ({type(mlp.norm).__name__}) has no MoE equivalent")
    has_bias = (mlp.fc1.bias is not None, mlp.fc2.bias is not None)
    drops = (mlp.drop1.p, mlp.drop2.p)
    if has_bias[0] != has_bias[1] or drops[0] != drops[1]:
        raise ValueError(f"MoE experts need the same bias and dropout on fc1 and fc2; got bias={has_bias}, "
                         f"drop={drops}")
    return dict(in_features=mlp.fc1.in_features, hidden_features=mlp.fc1.out_features,
                out_features=mlp.fc2.out_features, act_layer=_act_layer(mlp.act), bias=has_bias[0], drop=drops[0])


def _config(moe: MoEConfig | None, settings: dict[str, Any]) -> MoEConfig:
    """``moe`` with keyword ``settings`` (MoEConfig field names) on top; settings alone make a new one."""
    unknown = sorted(set(settings) - set(MoEConfig.field_names()))
    if unknown:
        raise TypeError(f"unknown MoE settings {unknown}; valid: {list(MoEConfig.field_names())}")
    if moe is None:
        return MoEConfig.from_flat(**settings)
    return moe.replace(**settings) if settings else moe


def convert_to_moe(model: nn.Module, moe: MoEConfig | None = None, **settings: Any) -> nn.Module:
    """Replace ``model.blocks[i].mlp`` by a freshly initialised MoE block for each chosen block, in place.

    ``moe``: a :class:`vmoe.moe.MoEConfig`; keyword ``settings`` are its fields (moe_layers, num_experts,
    k, capacity_factor, eval_capacity_factor, batch_priority, noise_std, group_size, router, moe_kwargs)
    and override it. ``num_experts`` is one count for every MoE block or a list with one count per MoE
    block (in block order), e.g. a pyramid. None = the router's default (for "vmoe": K=2, 1.05, same as
    training, 1.0, whole batch). Returns ``model``. Weights of the new blocks are random; see
    :func:`vmoe.models.upcycle_state_dict` to start them from the dense MLPs.
    """
    moe = _config(moe, settings)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(f"expected a timm ViT with a `blocks` sequence, got {type(model).__name__}")
    indices = parse_moe_layers(moe.moe_layers, len(blocks))
    try:
        counts = moe.experts_per_layer(len(indices))
    except ValueError as err:
        raise ValueError(f"{err}: MoE blocks {indices}") from None
    routing = moe.settings
    if moe.router == "soft" and routing.group_size is None:
        # Soft MoE mixes the tokens of one image (the paper's setting), not of the whole batch.
        routing = routing.replace(group_size=_tokens_per_image(model))
    for index, count in zip(indices, counts):
        block = blocks[index]
        ref = block.mlp.fc1.weight if isinstance(getattr(block.mlp, "fc1", None), nn.Linear) else None
        layer = build_moe_mlp(router=moe.router, settings=routing, num_experts=count, **mlp_config(block.mlp),
                              **dict(moe.moe_kwargs or {}))
        # the new block lives where the dense one did (GPU, bf16 or meta models stay uniform)
        block.mlp = layer.to(device=ref.device, dtype=ref.dtype) if ref is not None else layer
    record_moe_args(model, moe.flat())  # the model now calls itself "vmoe" for timm's export
    return to_ensemble(model)  # E³ (router="ensemble"): the batch repeat before the first MoE block


def _tokens_per_image(model: nn.Module) -> int:
    """T of a timm ViT: its patches plus prefix tokens (class, registers)."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(patches, int):
        raise ValueError(f"cannot tell the tokens per image of {type(model).__name__} (no patch_embed.num_patches); "
                         "give Soft MoE a group_size")
    return patches + int(getattr(model, "num_prefix_tokens", 1))


def _load_starting_weights(model: nn.Module, checkpoint_path: str | os.PathLike,
                           upcycle_kwargs: dict[str, Any] | None) -> None:
    """V-MoE weights (with expert tensors) load strictly, resampling the position embedding and resetting a
    head of another size (fine-tuning); dense ViT weights are upcycled."""
    state = read_state_dict(checkpoint_path)
    own = model.state_dict()
    # a head of another class count is left at its fresh initialisation (fine-tuning): say so on the model
    model.reset_head = holds_experts(state) and any(
        key in state and key in own and state[key].shape != own[key].shape for key in ("head.weight", "head.bias"))
    load_weights(model, starting_state_dict(state, model, upcycle_kwargs, source=repr(os.fspath(checkpoint_path))))


def create_vmoe(
    backbone: str = "vit_small_patch16_224",
    moe: MoEConfig | None = None,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    upcycle_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm VisionTransformer (``backbone`` + timm kwargs: img_size, patch_size, in_chans, num_classes,
    depth, embed_dim, num_heads, ...) whose chosen blocks have MoE MLPs.

    The MoE settings come as ``moe`` (a :class:`vmoe.moe.MoEConfig`) and/or as keywords named like its
    fields (moe_layers="every-2", num_experts=8, k, capacity_factor, eval_capacity_factor,
    batch_priority, noise_std, group_size, router="vmoe", moe_kwargs), which override it.
    pretrained=True: timm loads the backbone's dense pretrained weights (its hub loading, resampling the
    position embeddings and resetting the head as usual) and the model is upcycled from them.
    checkpoint_path: a weights file (.safetensors/.pth/.pt/.bin/.ckpt). V-MoE weights (with expert
    tensors) load strictly, except that the position embedding is resampled to another image size and a
    head of another class count is reset (fine-tuning; ``model.reset_head`` is then True); dense ViT weights are
    upcycled. ``upcycle_kwargs`` (expert_noise,
    router_init_std) tune upcycling. Input x: [B, C, H, W] -> logits [B, num_classes].
    """
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True (timm's dense weights) or checkpoint_path, not both")
    settings = {key: kwargs.pop(key) for key in list(kwargs) if key in MoEConfig.field_names()}
    moe = _config(moe, settings)  # checked before timm builds anything
    model = timm.create_model(backbone, pretrained=pretrained, **kwargs)
    dense_state = model.state_dict() if pretrained else None  # holds the dense MLP tensors across the swap
    convert_to_moe(model, moe)
    if dense_state is not None:
        model.load_state_dict(upcycle_state_dict(dense_state, model, **(upcycle_kwargs or {})))
    elif checkpoint_path is not None:
        _load_starting_weights(model, checkpoint_path, upcycle_kwargs)
    elif upcycle_kwargs:
        raise ValueError("upcycle_kwargs needs pretrained=True or a dense checkpoint_path to upcycle from")
    return record_input_size(model)


# Arguments of build_network (and of the Lightning module) that model_kwargs, timm's, must not repeat.
_OWN_KEYS = ("num_classes", "img_size", "in_chans", "pretrained", "checkpoint_path", "upcycle_kwargs",
             *MoEConfig.field_names())


def build_network(backbone: str, *, num_classes: int, img_size: int, in_chans: int, moe: MoEConfig | None,
                  pretrained: bool = False, checkpoint_path: str | None = None,
                  model_kwargs: dict[str, Any] | None = None,
                  upcycle_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A timm ViT: V-MoE via ``vmoe.models.create_vmoe`` (which also upcycles a dense ``checkpoint_path``), or,
    when ``moe`` is None, the dense backbone through ``timm.create_model`` with the same width/depth."""
    model_kwargs = dict(model_kwargs or {})
    clash = sorted(set(model_kwargs) & set(_OWN_KEYS))
    if clash:
        raise ValueError(f"model_kwargs must not set {clash}: they are ImageClassifier arguments of their own")
    common = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, **model_kwargs)
    if moe is None:
        model = timm.create_model(backbone, pretrained=pretrained, **common)
        if checkpoint_path is not None:
            load_weights(model, checkpoint_path)
        return model
    return create_vmoe(backbone, moe, pretrained=pretrained, checkpoint_path=checkpoint_path,
                       upcycle_kwargs=upcycle_kwargs, **common)


def _is_checkpoint_path(source: Any) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return isinstance(source, str) and (Path(source).suffix in _CKPT_SUFFIXES or Path(source).is_file())


def _upcycle_instance(source: nn.Module, backbone: str | None, kwargs: dict[str, Any],
                      up: dict[str, Any]) -> nn.Module:
    settings = {key: kwargs.pop(key) for key in list(kwargs) if key in MoEConfig.field_names()}
    moe = _config(kwargs.pop("moe", None), settings)
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
    convert_to_moe(model, moe)
    model.load_state_dict(upcycle_state_dict(dense_state, model, **up))
    return model


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

    ``kwargs``: :func:`create_vmoe` arguments (moe, moe_layers, num_experts, k, ...) and timm kwargs
    (img_size, num_classes, ...; for an instance only img_size and num_classes can change).
    """
    up = dict(expert_noise=expert_noise, router_init_std=router_init_std, generator=generator)
    if isinstance(source, nn.Module):
        return _upcycle_instance(source, backbone, kwargs, up)
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
