"""Build a V-MoE from a timm ViT: choose the MoE blocks (SPEC 4) and swap their dense MLPs for MoE blocks."""
from __future__ import annotations

import copy
import functools
import os
import re
from typing import Any, Sequence

import timm
from timm.layers import Mlp
from torch import nn

from ..moe import build_moe_mlp

__all__ = ["parse_moe_layers", "mlp_config", "convert_to_moe", "create_vmoe"]

# create_vmoe's own MoE arguments; moe_kwargs must not repeat them.
_MOE_ARGS = ("num_experts", "k", "capacity_factor", "eval_capacity_factor", "batch_priority", "noise_std",
             "group_size", "router")


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


def convert_to_moe(
    model: nn.Module,
    *,
    moe_layers: str | Sequence[int] = "every-2",
    num_experts: int | Sequence[int] = 8,
    k: int | None = None,
    capacity_factor: float | None = None,
    eval_capacity_factor: float | None = None,
    batch_priority: bool = False,
    noise_std: float | None = None,
    group_size: int | None = None,
    router: str = "vmoe",
    moe_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Replace ``model.blocks[i].mlp`` by a freshly initialised MoE block for each chosen block, in place.

    ``num_experts`` is one count for every MoE block or a list with one count per MoE block (in block
    order), e.g. a pyramid. k, capacity_factor, eval_capacity_factor, noise_std, group_size: None = the
    router's default (for "vmoe": K=2, 1.05, same as training, 1.0, whole batch). Returns ``model``.
    Weights of the new blocks are random; see :func:`vmoe.models.upcycle_state_dict` to start them from
    the dense MLPs.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(f"expected a timm ViT with a `blocks` sequence, got {type(model).__name__}")
    indices = parse_moe_layers(moe_layers, len(blocks))
    if isinstance(num_experts, int) and not isinstance(num_experts, bool):
        counts = [num_experts] * len(indices)
    elif isinstance(num_experts, (list, tuple)) and len(num_experts) == len(indices):
        counts = list(num_experts)
    else:
        raise ValueError(f"num_experts={num_experts!r} must be an int or a list with one count per MoE block "
                         f"({len(indices)} blocks: {indices})")
    extra = dict(moe_kwargs or {})
    clash = sorted(set(extra) & set(_MOE_ARGS + ("in_features", "hidden_features", "out_features",
                                                  "act_layer", "bias", "drop")))
    if clash:
        raise ValueError(f"moe_kwargs repeats arguments set elsewhere: {clash}; pass them directly")
    # None = the router's own default (vmoe: k=2, capacity_factor=1.05, noise_std=1.0); schemes such as
    # expert_choice or soft reject settings they do not use, so unset ones are not passed at all.
    optional = {name: value for name, value in dict(k=k, capacity_factor=capacity_factor,
                                                    eval_capacity_factor=eval_capacity_factor,
                                                    noise_std=noise_std, group_size=group_size).items()
                if value is not None}
    if batch_priority:
        optional["batch_priority"] = True
    for index, count in zip(indices, counts):
        block = blocks[index]
        ref = block.mlp.fc1.weight if isinstance(getattr(block.mlp, "fc1", None), nn.Linear) else None
        moe = build_moe_mlp(router=router, **mlp_config(block.mlp), num_experts=count, **optional, **extra)
        # the new block lives where the dense one did (GPU, bf16 or meta models stay uniform)
        block.mlp = moe.to(device=ref.device, dtype=ref.dtype) if ref is not None else moe
    from .hub import record_moe_args  # the model now calls itself "vmoe" (not its dense backbone) for timm's export

    record_moe_args(model, dict(moe_layers=moe_layers, num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                                eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                                noise_std=noise_std, group_size=group_size, router=router, moe_kwargs=moe_kwargs))

    from .ensemble import to_ensemble  # E³ (router="ensemble"): the batch repeat before the first MoE block

    return to_ensemble(model)


def create_vmoe(
    backbone: str = "vit_small_patch16_224",
    *,
    moe_layers: str | Sequence[int] = "every-2",
    num_experts: int | Sequence[int] = 8,
    k: int | None = None,
    capacity_factor: float | None = None,
    eval_capacity_factor: float | None = None,
    batch_priority: bool = False,
    noise_std: float | None = None,
    group_size: int | None = None,
    router: str = "vmoe",
    moe_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    upcycle_kwargs: dict[str, Any] | None = None,
    **timm_kwargs,
) -> nn.Module:
    """A timm VisionTransformer (``backbone`` + ``timm_kwargs``: img_size, patch_size, in_chans,
    num_classes, depth, embed_dim, num_heads, ...) whose chosen blocks have MoE MLPs.

    pretrained=True: timm loads the backbone's dense pretrained weights (its hub loading, resampling the
    position embeddings and resetting the head as usual) and the model is upcycled from them.
    checkpoint_path: a weights file (.safetensors/.pth/.pt/.bin/.ckpt). V-MoE weights (with expert
    tensors) load strictly, except that the position embedding is resampled to another image size and a
    head of another class count is reset (fine-tuning); dense ViT weights are upcycled. ``upcycle_kwargs`` (expert_noise,
    router_init_std) tune upcycling. Input x: [B, C, H, W] -> logits [B, num_classes].
    """
    from .checkpoint import load_weights, read_state_dict
    from .upcycle import upcycle_state_dict

    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True (timm's dense weights) or checkpoint_path, not both")
    moe = dict(moe_layers=moe_layers, num_experts=num_experts, k=k, capacity_factor=capacity_factor,
               eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority, noise_std=noise_std,
               group_size=group_size, router=router, moe_kwargs=moe_kwargs)
    model = timm.create_model(backbone, pretrained=pretrained, **timm_kwargs)
    dense_state = model.state_dict() if pretrained else None  # holds the dense MLP tensors across the swap
    convert_to_moe(model, **moe)
    if dense_state is not None:
        model.load_state_dict(upcycle_state_dict(dense_state, model, **(upcycle_kwargs or {})))
    elif checkpoint_path is not None:
        state = read_state_dict(checkpoint_path)
        if any(".experts." in key for key in state):
            if upcycle_kwargs:
                raise ValueError(f"upcycle_kwargs given but {os.fspath(checkpoint_path)!r} already holds "
                                 "V-MoE weights (expert tensors); nothing is upcycled")
            from .finetune import finetune_state_dict  # new image size / class count: resample, reset head

            load_weights(model, finetune_state_dict(state, model))
        else:
            model.load_state_dict(upcycle_state_dict(state, model, **(upcycle_kwargs or {})))
    elif upcycle_kwargs:
        raise ValueError("upcycle_kwargs needs pretrained=True or a dense checkpoint_path to upcycle from")
    return model
