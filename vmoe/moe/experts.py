"""Stacked expert MLPs (docs/design.md, "Weight layout"): E copies of timm's Mlp (fc1, act, drop, fc2, drop) in one module."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import compute_dtype
from .expert_blocks import expert_mlp_blocks
from .grad_buffers import GradientBuffers

__all__ = ["StackedExperts", "grouped_mm_helps"]


def grouped_mm_helps(device: torch.device, dtype: torch.dtype) -> bool:
    """grouped_mm only has fast kernels for bf16 on CUDA (SM >= 80); elsewhere the block loop is faster."""
    return (hasattr(F, "grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 0))


class StackedExperts(nn.Module):
    """E expert MLPs with weights stacked on a leading expert axis, nn.Linear layout per expert.

    Parameters: fc1_weight [E, H, D], fc1_bias [E, H], fc2_weight [E, D, H], fc2_bias [E, D].
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        reuse_grad_memory: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.num_experts, self.in_features, self.hidden_features, self.out_features = (
            num_experts, in_features, hidden_features, out_features)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_features, in_features))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, out_features, hidden_features))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_features)) if bias else None
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        if not isinstance(reuse_grad_memory, bool):
            raise ValueError(f"reuse_grad_memory must be True or False, got {reuse_grad_memory!r}")
        # CPU only, and only when nothing else holds the previous gradient (see vmoe/moe/grad_buffers.py).
        self.grad_buffers = GradientBuffers() if reuse_grad_memory else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like a fresh nn.Linear pair."""
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            fan_in = weight.shape[-1]
            for w in weight.data:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if bias is not None:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(bias, -bound, bound)

    def _mlp(self, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        return self.drop(F.linear(self.drop(self.act(F.linear(x, w1, b1))), w2, b2))

    def sorted_path(self, x: Tensor) -> str:
        """Which kernel ``forward`` runs for x: "grouped" (grouped_mm), "blocks" (the in-place autograd
        Function) or "loop" (plain autograd, needed for dropout in training). Decided on the dtype the
        experts compute in, so bf16 autocast over float32 activations takes the grouped path on CUDA."""
        if grouped_mm_helps(x.device, compute_dtype(x)):
            return "grouped"
        if not (self.training and self.drop.p > 0):  # dropout masks would need saving: autograd loop then
            return "blocks"
        return "loop"

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """Run expert e on its contiguous block of rows (in the autocast dtype under autocast).

        x: [A, D] rows sorted by expert; counts: E ints, rows per expert (sum = A). Returns [A, D_out].
        """
        path = self.sorted_path(x)
        if path == "grouped":
            return self._forward_grouped(x, counts)
        if path == "blocks":
            return self._forward_blocks(x, counts)
        return self._forward_loop(x, counts)

    def forward_buffers(self, x: Tensor) -> Tensor:
        """Expert e on its buffer x[e]: x [E, M, D] -> [E, M, D_out], one batched matmul per layer
        (bias fused), in the autocast dtype under autocast (the static-capacity path).

        Computed transposed, h^T = W1 x^T [E, H, M]: autograd's bmm backward then produces the weight
        gradients directly in the parameters' [E, H, D] / [E, D, H] layout (the untransposed form makes
        [E, D, H] gradients that AccumulateGrad copies into the parameter layout, E*H*D floats per layer).
        """
        dtype = compute_dtype(x)
        w1, w2 = self.fc1_weight.to(dtype), self.fc2_weight.to(dtype)
        # Cast once above instead of letting autocast cast again (entering the context only when it is on
        # keeps exported graphs free of autocast wrappers).
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            xt = x.to(dtype).transpose(1, 2)  # [E, D, M]
            if self.fc1_bias is not None:
                ht = torch.baddbmm(self.fc1_bias.to(dtype).unsqueeze(-1), w1, xt)
            else:
                ht = torch.bmm(w1, xt)
            at = self.act(ht)  # [E, H, M]
            if self.drop.p > 0:
                at = self.drop(at)
            if self.fc2_bias is not None:
                yt = torch.baddbmm(self.fc2_bias.to(dtype).unsqueeze(-1), w2, at)
            else:
                yt = torch.bmm(w2, at)
        y = yt.transpose(1, 2)  # [E, M, D_out]
        return self.drop(y) if self.drop.p > 0 else y

    def _forward_loop(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        # unbind, not weight[e]: indexing a stacked parameter inside autograd allocates a full-size
        # gradient per slice in backward; unbind's backward stacks the slices once.
        w1s, w2s = self.fc1_weight.unbind(0), self.fc2_weight.unbind(0)
        b1s = self.fc1_bias.unbind(0) if self.fc1_bias is not None else [None] * self.num_experts
        b2s = self.fc2_bias.unbind(0) if self.fc2_bias is not None else [None] * self.num_experts
        outputs = [
            self._mlp(chunk, w1s[e], b1s[e], w2s[e], b2s[e])
            for e, chunk in enumerate(torch.split(x, list(counts)))
            if chunk.shape[0] > 0
        ]
        if not outputs:
            return x.new_zeros(0, self.out_features)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _forward_blocks(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        params = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # The Function writes into preallocated buffers, which autocast cannot do: cast up front instead.
            dtype = torch.get_autocast_dtype(device)
            x = x.to(dtype)
            params = tuple(None if p is None else p.to(dtype) for p in params)
            with torch.autocast(device, enabled=False):
                return expert_mlp_blocks(x, counts, self.act, *params, self.grad_buffers)
        params = tuple(None if p is None else p.to(x.dtype) for p in params)
        return expert_mlp_blocks(x, counts, self.act, *params, self.grad_buffers)

    def _forward_grouped(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        dtype = compute_dtype(x)
        x = x.to(dtype)
        h = F.grouped_mm(x, self.fc1_weight.to(dtype).transpose(-2, -1), offs=offs)
        if self.fc1_bias is not None:
            h = h + torch.repeat_interleave(self.fc1_bias.to(dtype), offs.diff(prepend=offs.new_zeros(1)), 0,
                                            output_size=x.shape[0])
        h = self.drop(self.act(h))
        y = F.grouped_mm(h, self.fc2_weight.to(dtype).transpose(-2, -1), offs=offs)
        if self.fc2_bias is not None:
            y = y + torch.repeat_interleave(self.fc2_bias.to(dtype), offs.diff(prepend=offs.new_zeros(1)), 0,
                                            output_size=x.shape[0])
        return self.drop(y)

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x [N, D] -> [N, D_out]; the readable form the reference path uses."""
        b1 = self.fc1_bias[e] if self.fc1_bias is not None else None
        b2 = self.fc2_bias[e] if self.fc2_bias is not None else None
        return self._mlp(x, self.fc1_weight[e], b1, self.fc2_weight[e], b2)

    def train(self, mode: bool = True) -> "StackedExperts":
        # Gradient memory is a training cache: evaluation and inference should not hold it.
        if not mode and self.grad_buffers is not None:
            self.grad_buffers.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        # .to(device/dtype) makes the held buffers useless (shapes or devices no longer match): free them.
        if self.grad_buffers is not None:
            self.grad_buffers.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"hidden_features={self.hidden_features}, out_features={self.out_features}")
