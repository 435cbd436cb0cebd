"""The expert MLPs over contiguous row blocks as one autograd Function.

Writing each expert's result straight into preallocated buffers (and each weight gradient straight into its
slice of the stacked gradient) avoids what plain autograd does around a per-expert loop: concatenating the
outputs, concatenating the input gradients, and stacking E weight-gradient slices once more in backward.
The activation is elementwise, so the forward runs it once over all blocks; backward goes block by block
(small temporaries) and calls GELU's derivative kernel directly, other activations through autograd.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["expert_mlp_blocks"]


def _bounds(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _linear_blocks(x: Tensor, w: Tensor, b: Tensor | None, blocks, out: Tensor) -> Tensor:
    """out[block of e] = x[block of e] @ w[e]^T + b[e]."""
    for e, r0, r1 in blocks:
        if b is not None:
            torch.addmm(b[e], x[r0:r1], w[e].t(), out=out[r0:r1])
        else:
            torch.mm(x[r0:r1], w[e].t(), out=out[r0:r1])
    return out


class _ExpertMLPBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, counts: Sequence[int], act: Callable[[Tensor], Tensor], w1: Tensor,
                b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        blocks = _bounds(counts)
        h_pre = _linear_blocks(x, w1, b1, blocks, x.new_empty(x.shape[0], w1.shape[1]))
        a = act(h_pre)
        y = _linear_blocks(a, w2, b2, blocks, x.new_empty(x.shape[0], w2.shape[1]))
        ctx.save_for_backward(x, h_pre, a, w1, w2)
        ctx.blocks, ctx.act, ctx.has_bias = blocks, act, (b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, h_pre, a, w1, w2 = ctx.saved_tensors
        blocks, act = ctx.blocks, ctx.act
        need_x, _, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        # Uninitialised: the blocks cover every row of x, and experts without rows are zeroed below.
        gx = torch.empty_like(x) if need_x else None
        gw1 = torch.empty_like(w1) if need_w1 else None
        gw2 = torch.empty_like(w2) if need_w2 else None
        gb1 = w1.new_empty(w1.shape[:2]) if need_b1 and ctx.has_bias[0] else None
        gb2 = w2.new_empty(w2.shape[:2]) if need_b2 and ctx.has_bias[1] else None
        idle = sorted(set(range(w1.shape[0])) - {e for e, _, _ in blocks})
        for g in (gw1, gb1, gw2, gb2):
            if g is not None and idle:
                g[idle] = 0
        # Block by block, so the temporaries of backward stay [n_e, H] instead of [A, H].
        for e, r0, r1 in blocks:
            gy = grad_y[r0:r1]
            if gw2 is not None:
                torch.mm(gy.t(), a[r0:r1], out=gw2[e])
            if gb2 is not None:
                torch.sum(gy, 0, out=gb2[e])
            ga = gy @ w2[e]
            if isinstance(act, nn.GELU):
                # In place: ga is not needed afterwards.
                gh = torch.ops.aten.gelu_backward.grad_input(ga, h_pre[r0:r1], approximate=act.approximate,
                                                             grad_input=ga)
            else:
                with torch.enable_grad():
                    h = h_pre[r0:r1].detach().requires_grad_()
                    (gh,) = torch.autograd.grad(act(h), h, ga)
            if gw1 is not None:
                torch.mm(gh.t(), x[r0:r1], out=gw1[e])
            if gb1 is not None:
                torch.sum(gh, 0, out=gb1[e])
            if gx is not None:
                torch.mm(gh, w1[e], out=gx[r0:r1])
        return gx, None, None, gw1, gb1, gw2, gb2


def expert_mlp_blocks(x: Tensor, counts: Sequence[int], act: Callable[[Tensor], Tensor], w1: Tensor,
                      b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    """fc2(act(fc1(x))) with expert e's weights on its block of rows; ``act`` must be elementwise.

    x: [A, D] sorted by expert; counts: E ints (sum A); w1 [E, H, D], b1 [E, H], w2 [E, D_out, H],
    b2 [E, D_out]; all of one dtype (cast before calling under autocast). Returns [A, D_out].
    """
    if sum(counts) != x.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but x has {x.shape[0]} rows")
    return _ExpertMLPBlocks.apply(x.contiguous(), list(counts), act, w1, b1, w2, b2)
