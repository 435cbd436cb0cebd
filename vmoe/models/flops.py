"""Parameters, parameters active per token and forward FLOPs of a dense ViT and its V-MoE.

FLOPs are counted analytically from the built model (2 per multiply-add, matrix products only: patch
embedding, qkv/attention/projection, MLPs or K experts per token plus the router, classifier); norms,
activations, softmax and biases are left out, as torch's FlopCounterMode does. Expert compute counts
the experts each token really uses (:func:`choices_per_token`): K for top-k routers when nothing is dropped
(the upper bound: dropped assignments cost nothing in the sort-based dispatch), about the capacity factor c
for expert choice, E for a dense MoE, E * p / S slot passes for Soft MoE. Models are built on the meta device, so even V-MoE-L costs no memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import timm
import torch
from torch import nn

from ..moe import MoEMlpBase, SoftMoEMlp, is_moe_mlp
from .build import create_vmoe

__all__ = ["ModelCost", "model_cost", "choices_per_token", "flops_table", "report"]


@dataclass(frozen=True)
class ModelCost:
    name: str
    params: int
    active_params: int  # per token: all dense weights plus the experts a token uses (see choices_per_token)
    flops: int  # forward, per image
    experts_per_token: float | None = None  # mean over the MoE layers of choices_per_token; None when dense

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _linear_flops(tokens: int, layer: nn.Linear) -> int:
    return 2 * tokens * layer.in_features * layer.out_features


def choices_per_token(layer: MoEMlpBase, group_size: int) -> float:
    """Experts that process a token, on average, in a routing group of ``group_size`` tokens (S).

    Top-k routers (including ``dense``, whose k is E): min(K, E * C / S) with C the block's capacity per
    expert: K when capacity is ample (the upper bound: dropped assignments cost nothing), fewer when the
    slots cannot hold K per token (e.g. dense MoE at capacity factor < 1). Expert choice: exactly E * C / S,
    each expert taking C = min(S, ceil(S * c / E)) tokens (about c per token; its k is E only formally).
    Soft MoE: E * p / S, each of the E experts running its p slots once per group of S tokens.
    The block's current mode picks the training or the eval capacity factor.
    """
    if isinstance(layer, SoftMoEMlp):
        return layer.num_experts * layer.slots_per_expert / group_size
    k = layer.experts_per_token
    if k is None:
        raise ValueError(f"FLOPs of {type(layer).__name__} are not modelled (a token uses no fixed number "
                         "of experts)")
    capacity = layer.capacity(group_size)
    if capacity is None:
        return float(k)
    slots = layer.num_experts * capacity / group_size
    if layer.router.experts_choose:
        return slots
    return min(float(k), slots)


def _moe_cost(tokens: int, layer: MoEMlpBase, batch_size: int = 1) -> tuple[int, int]:
    """(forward FLOPs, parameters not active for a token) of one MoE layer per image of ``tokens`` tokens,
    in routing groups of the layer's ``group_size`` (None: the whole batch of ``batch_size`` images, as in
    the forward). Soft MoE: every token reaches every
    expert through the slots, so all its parameters are active; its mixing is 3 products per token of
    width E * p (logits x Phi, the dispatch into slots, the combine out of them)."""
    experts = layer.experts
    num, hidden, dim = experts.fc1_weight.shape
    out = experts.fc2_weight.shape[1]
    choices = choices_per_token(layer, layer.group_size or batch_size * tokens)
    flops = round(choices * 2 * tokens * (dim * hidden + hidden * out))
    router_weight = getattr(layer.router, "weight", None)
    if isinstance(router_weight, nn.Parameter):
        flops += 2 * tokens * router_weight.numel()
    # dense parts every token runs: shared experts, a residual MLP and its coefficients, linear routers
    flops += sum(_linear_flops(tokens, m) for m in layer.modules() if isinstance(m, nn.Linear))
    if isinstance(layer, SoftMoEMlp):
        flops += 2 * tokens * num * layer.slots_per_expert * (2 * dim + out)
        return flops, 0
    per_expert = sum(p.numel() for p in experts.parameters()) // num
    return flops, round((num - choices) * per_expert)


def model_tokens(model: nn.Module) -> int:
    """Tokens per image of a timm ViT: patches plus class (and register) tokens, which go through every block."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def model_cost(model: nn.Module, name: str | None = None, batch_size: int = 1) -> ModelCost:
    """Cost per image of a timm VisionTransformer (dense or V-MoE) at its configured image size, for a
    forward of ``batch_size`` images (it matters only for MoE layers whose group_size is None: their
    routing group is the whole batch, and capacity rounding depends on the group's size)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    patches = model.patch_embed.num_patches
    tokens = model_tokens(model)
    proj = model.patch_embed.proj
    flops = 2 * patches * proj.weight.numel()  # conv with stride = kernel: one weight use per patch
    inactive = 0
    choices = []
    for block in model.blocks:
        attn = block.attn
        dim = attn.qkv.in_features
        flops += _linear_flops(tokens, attn.qkv) + _linear_flops(tokens, attn.proj)
        flops += 2 * 2 * tokens * tokens * dim  # scores q k^T and the weighted sum of v, over all heads
        if is_moe_mlp(block.mlp):
            moe_flops, moe_inactive = _moe_cost(tokens, block.mlp, batch_size)
            flops += moe_flops
            inactive += moe_inactive
            choices.append(choices_per_token(block.mlp, block.mlp.group_size or batch_size * tokens))
        else:
            flops += _linear_flops(tokens, block.mlp.fc1) + _linear_flops(tokens, block.mlp.fc2)
    if isinstance(model.head, nn.Linear):
        flops += _linear_flops(1, model.head)
    params = sum(p.numel() for p in model.parameters())
    per_token = sum(choices) / len(choices) if choices else None
    return ModelCost(name or type(model).__name__, params, params - inactive, flops, per_token)


def flops_table(costs: Sequence[ModelCost]) -> str:
    """A plain-text table of costs, with ratios to the first row."""
    base = costs[0]
    header = (f"{'model':<34} {'params':>10} {'active/token':>13} {'experts/token':>14} {'GFLOPs/img':>11} "
              f"{'x params':>9} {'x FLOPs':>8}")
    rows = [header, "-" * len(header)]
    for cost in costs:
        per_token = "-" if cost.experts_per_token is None else f"{cost.experts_per_token:.3g}"
        rows.append(f"{cost.name:<34} {cost.params / 1e6:>9.2f}M {cost.active_params / 1e6:>12.2f}M "
                    f"{per_token:>14} {cost.gflops:>11.3f} {cost.params / base.params:>9.2f} "
                    f"{cost.flops / base.flops:>8.3f}")
    return "\n".join(rows)


def report(
    backbone: str = "vit_small_patch16_224",
    moe_layers: list[int] | str = "every-2",
    num_experts: list[int] | int = 8,
    k: int | None = 2,
    img_size: int = 224,
    num_classes: int = 1000,
    router: str = "vmoe",
    capacity_factor: float | None = None,
) -> str:
    """Print and return the cost table of the dense ``backbone`` and its V-MoE at ``img_size``.

    Args:
        backbone: timm ViT name.
        moe_layers: "every-n", "last-n" or a list of block indices.
        num_experts: experts per MoE layer (one count, or one per MoE layer).
        k: experts chosen per token (top-k routers; None for expert_choice, dense and soft, which choose otherwise).
        img_size: input image side in pixels.
        num_classes: classifier outputs.
        router: routing scheme (vmoe, switch, expert_choice, dense, ...).
        capacity_factor: None = the scheme's default (for expert_choice: experts per token on average).
    """
    with torch.device("meta"):
        dense = timm.create_model(backbone, pretrained=False, img_size=img_size, num_classes=num_classes)
        if router in ("expert_choice", "dense", "soft") and k == 2:
            k = None  # the default of --k; these schemes take no k
        moe = create_vmoe(backbone, moe_layers=moe_layers, num_experts=num_experts, k=k, img_size=img_size,
                          num_classes=num_classes, router=router, capacity_factor=capacity_factor)
    experts = num_experts if isinstance(num_experts, int) else "/".join(map(str, num_experts))
    placement = moe_layers if isinstance(moe_layers, str) else ",".join(map(str, moe_layers))
    scheme = f"K{k}" if router not in ("expert_choice", "dense", "soft") else router
    costs = [model_cost(dense, f"{backbone}"),
             model_cost(moe, f"V-MoE E{experts} {scheme} {placement}")]
    table = (f"{backbone} at {img_size}px, {num_classes} classes, MoE blocks {placement}\n"
             + flops_table(costs))
    print(table)
    return table

