"""Sparse upcycling: start a V-MoE from a dense ViT (Komatsuzaki et al. 2022).

Every expert of an MoE block starts as a copy of that block's dense MLP (plus optional noise), the router
starts small so the first steps route almost uniformly, and every other tensor is copied; timm's ViT
checkpoint filter converts foreign formats and resamples patch/position embeddings, the head is reset
when the class count differs.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ..moe import iter_moe_layers
from .checkpoint import extract_state_dict

__all__ = ["upcycle_state_dict", "EXPERT_FROM_DENSE"]

_log = logging.getLogger(__name__)
# Stacked expert tensor name -> dense timm Mlp tensor it copies (SPEC 6: nn.Linear layout per expert).
EXPERT_FROM_DENSE = {"experts.fc1_weight": "fc1.weight", "experts.fc1_bias": "fc1.bias",
                     "experts.fc2_weight": "fc2.weight", "experts.fc2_bias": "fc2.bias"}
_RESIDUAL = "residual.mlp."  # DeepSpeed-MoE residual block: a dense Mlp beside the experts


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
        state = checkpoint_filter_fn(state, model)  # foreign layouts, patch/pos-embed resampling
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
