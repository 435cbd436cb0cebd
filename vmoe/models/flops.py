"""Parameters, parameters active per token and forward FLOPs of a dense ViT and its V-MoE.

FLOPs are counted analytically from the built model (2 per multiply-add, matrix products only: patch
embedding, qkv/attention/projection, MLPs or K experts per token plus the router, classifier); norms,
activations, softmax and biases are left out, as torch's FlopCounterMode does. Expert compute counts
every token's K assignments, the upper bound when no token is dropped (dropped assignments cost nothing
in the sort-based dispatch). Models are built on the meta device, so even V-MoE-L costs no memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import timm
import torch
from torch import nn

from ..moe import is_moe_layer
from .build import create_vmoe

__all__ = ["ModelCost", "model_cost", "flops_table", "report", "main"]


@dataclass(frozen=True)
class ModelCost:
    name: str
    params: int
    active_params: int  # per token: all dense weights plus K of each MoE layer's E experts
    flops: int  # forward, per image

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _linear_flops(tokens: int, layer: nn.Linear) -> int:
    return 2 * tokens * layer.in_features * layer.out_features


def _moe_cost(tokens: int, layer: nn.Module) -> tuple[int, int]:
    """(forward FLOPs, parameters not active for a token) of one MoE layer."""
    experts = getattr(layer, "experts", None)
    if not hasattr(layer, "k") or not hasattr(experts, "fc1_weight"):
        raise ValueError(f"FLOPs of {type(layer).__name__} are not modelled (needs k and stacked experts)")
    num, hidden, dim = experts.fc1_weight.shape
    out = experts.fc2_weight.shape[1]
    flops = layer.k * 2 * tokens * (dim * hidden + hidden * out)
    router_weight = getattr(getattr(layer, "router", None), "weight", None)
    if isinstance(router_weight, nn.Parameter):
        flops += 2 * tokens * router_weight.numel()
    # dense parts every token runs: shared experts, a residual MLP and its coefficients, linear routers
    flops += sum(_linear_flops(tokens, m) for m in layer.modules() if isinstance(m, nn.Linear))
    per_expert = sum(p.numel() for p in experts.parameters()) // num
    return flops, (num - layer.k) * per_expert


def model_cost(model: nn.Module, name: str | None = None) -> ModelCost:
    """Cost of a timm VisionTransformer (dense or V-MoE) at its configured image size."""
    patches = model.patch_embed.num_patches
    tokens = patches + model.num_prefix_tokens  # class (and register) tokens go through every block
    proj = model.patch_embed.proj
    flops = 2 * patches * proj.weight.numel()  # conv with stride = kernel: one weight use per patch
    inactive = 0
    for block in model.blocks:
        attn = block.attn
        dim = attn.qkv.in_features
        flops += _linear_flops(tokens, attn.qkv) + _linear_flops(tokens, attn.proj)
        flops += 2 * 2 * tokens * tokens * dim  # scores q k^T and the weighted sum of v, over all heads
        if is_moe_layer(block.mlp):
            moe_flops, moe_inactive = _moe_cost(tokens, block.mlp)
            flops += moe_flops
            inactive += moe_inactive
        else:
            flops += _linear_flops(tokens, block.mlp.fc1) + _linear_flops(tokens, block.mlp.fc2)
    if isinstance(model.head, nn.Linear):
        flops += _linear_flops(1, model.head)
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(name or type(model).__name__, params, params - inactive, flops)


def flops_table(costs: Sequence[ModelCost]) -> str:
    """A plain-text table of costs, with ratios to the first row."""
    base = costs[0]
    header = f"{'model':<34} {'params':>10} {'active/token':>13} {'GFLOPs/img':>11} {'x params':>9} {'x FLOPs':>8}"
    rows = [header, "-" * len(header)]
    for cost in costs:
        rows.append(f"{cost.name:<34} {cost.params / 1e6:>9.2f}M {cost.active_params / 1e6:>12.2f}M "
                    f"{cost.gflops:>11.3f} {cost.params / base.params:>9.2f} {cost.flops / base.flops:>8.3f}")
    return "\n".join(rows)


def report(
    backbone: str = "vit_small_patch16_224",
    moe_layers: list[int] | str = "every-2",
    num_experts: list[int] | int = 8,
    k: int = 2,
    img_size: int = 224,
    num_classes: int = 1000,
) -> str:
    """Print and return the cost table of the dense ``backbone`` and its V-MoE at ``img_size``.

    Args:
        backbone: timm ViT name.
        moe_layers: "every-n", "last-n" or a list of block indices.
        num_experts: experts per MoE layer (one count, or one per MoE layer).
        k: experts chosen per token.
        img_size: input image side in pixels.
        num_classes: classifier outputs.
    """
    with torch.device("meta"):
        dense = timm.create_model(backbone, pretrained=False, img_size=img_size, num_classes=num_classes)
        moe = create_vmoe(backbone, moe_layers=moe_layers, num_experts=num_experts, k=k, img_size=img_size,
                          num_classes=num_classes)
    experts = num_experts if isinstance(num_experts, int) else "/".join(map(str, num_experts))
    placement = moe_layers if isinstance(moe_layers, str) else ",".join(map(str, moe_layers))
    costs = [model_cost(dense, f"{backbone}"),
             model_cost(moe, f"V-MoE E{experts} K{k} {placement}")]
    table = (f"{backbone} at {img_size}px, {num_classes} classes, MoE blocks {placement}\n"
             + flops_table(costs))
    print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    """``vmoe flops --backbone vit_small_patch16_224 --num_experts 8 --k 2 --moe_layers every-2``, or
    ``vmoe flops --config configs/quickstart.yaml [--config more.yaml]`` for the model of a training config."""
    import sys

    from jsonargparse import CLI

    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--config" or a.startswith("--config=") for a in args):
        from .flops_config import config_cost_table

        paths, rest, it = [], [], iter(args)
        for a in it:
            if a == "--config":
                paths.append(next(it, None) or "")
            elif a.startswith("--config="):
                paths.append(a.split("=", 1)[1])
            else:
                rest.append(a)
        if rest or not all(paths):
            raise SystemExit(f"vmoe flops --config takes only (repeated) --config FILE; got also {rest or 'an empty path'}")
        print(config_cost_table(paths))
        return
    CLI(report, args=args, as_positional=False)
