"""The expert MLPs over contiguous row blocks as one autograd Function.

Writing each expert's result straight into a preallocated output (and each weight gradient straight into its
slice of the stacked gradient) avoids what plain autograd does around a per-expert loop: concatenating the
outputs, concatenating the input gradients, and stacking E weight-gradient slices once more in backward.
Hidden activations are kept per block ([n_e, H] each, not one [A, H]): blocks that size are reused by the
allocator from step to step, where [A, H] would be fresh memory to page-fault in every step. Backward goes
block by block (small temporaries) and frees each block's activations once it is done, so the weight
gradients fill (E*H*D written expert by expert) as the activations empty: the peak memory is about the larger
of the two, not their sum. A second backward (retain_graph=True) recomputes the freed blocks from x.
Backward calls GELU's derivative kernel directly, other activations through
autograd. The stacked weight gradients come from :class:`~.grad_buffers.GradientBuffers` when given.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .grad_buffers import GradientBuffers

__all__ = ["expert_mlp_blocks"]


def _bounds(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _linear(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    """x @ w^T + b, into ``out`` when given."""
    if b is not None:
        return torch.addmm(b, x, w.t(), out=out)
    return torch.mm(x, w.t(), out=out)


class _ExpertMLPBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, counts: Sequence[int], act: Callable[[Tensor], Tensor], w1: Tensor,
                b1: Tensor | None, w2: Tensor, b2: Tensor | None, grad_buffers: GradientBuffers | None) -> Tensor:
        blocks = _bounds(counts)
        y = x.new_empty(x.shape[0], w2.shape[1])
        # One [n_e, H] pair per block rather than two [A, H] tensors: blocks this size come back from the
        # allocator's free lists step after step, where [A, H] tensors are fresh pages to fault in each time.
        hidden = []
        for e, r0, r1 in blocks:
            h_pre = _linear(x[r0:r1], w1[e], None if b1 is None else b1[e])
            a = act(h_pre)
            _linear(a, w2[e], None if b2 is None else b2[e], out=y[r0:r1])
            hidden += [h_pre, a]
        # The hidden blocks live on ctx, not in save_for_backward, so backward can free each block as soon as
        # it is done: the peak then holds the weight gradients *or* the activations of a block, not both.
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.hidden = hidden
        ctx.blocks, ctx.act, ctx.has_bias = blocks, act, (b1 is not None, b2 is not None)
        ctx.grad_buffers = grad_buffers
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, w1, b1, w2 = ctx.saved_tensors
        blocks, act, hidden = ctx.blocks, ctx.act, ctx.hidden
        need_x, _, _, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        new = ctx.grad_buffers.empty_like if ctx.grad_buffers is not None else lambda _, t: torch.empty_like(t)
        grad_y = grad_y.contiguous()
        # Uninitialised: the blocks cover every row of x, and experts without rows are zeroed below.
        gx = torch.empty_like(x) if need_x else None
        gw1 = new("fc1_weight", w1) if need_w1 else None
        gw2 = new("fc2_weight", w2) if need_w2 else None
        gb1 = w1.new_empty(w1.shape[:2]) if need_b1 and ctx.has_bias[0] else None
        gb2 = w2.new_empty(w2.shape[:2]) if need_b2 and ctx.has_bias[1] else None
        idle = sorted(set(range(w1.shape[0])) - {e for e, _, _ in blocks})
        for g in (gw1, gb1, gw2, gb2):
            if g is not None and idle:
                g[idle] = 0
        # Block by block, so the temporaries of backward stay [n_e, H] instead of [A, H].
        for i, (e, r0, r1) in enumerate(blocks):
            gy, h_pre, a = grad_y[r0:r1], hidden[2 * i], hidden[2 * i + 1]
            if h_pre is None:  # a second backward through this graph (retain_graph=True): recompute
                h_pre = _linear(x[r0:r1], w1[e], None if b1 is None else b1[e])
                a = act(h_pre)
            hidden[2 * i] = hidden[2 * i + 1] = None  # freed when this block is done (see forward)
            if gw2 is not None:
                torch.mm(gy.t(), a, out=gw2[e])
            if gb2 is not None:
                torch.sum(gy, 0, out=gb2[e])
            ga = gy @ w2[e]
            if isinstance(act, nn.GELU):
                # In place: ga is not needed afterwards.
                gh = torch.ops.aten.gelu_backward.grad_input(ga, h_pre, approximate=act.approximate,
                                                             grad_input=ga)
            else:
                with torch.enable_grad():
                    h = h_pre.detach().requires_grad_()
                    (gh,) = torch.autograd.grad(act(h), h, ga)
            if gw1 is not None:
                torch.mm(gh.t(), x[r0:r1], out=gw1[e])
            if gb1 is not None:
                torch.sum(gh, 0, out=gb1[e])
            if gx is not None:
                torch.mm(gh, w1[e], out=gx[r0:r1])
        return gx, None, None, gw1, gb1, gw2, gb2, None


def expert_mlp_blocks(x: Tensor, counts: Sequence[int], act: Callable[[Tensor], Tensor], w1: Tensor,
                      b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                      grad_buffers: GradientBuffers | None = None) -> Tensor:
    """fc2(act(fc1(x))) with expert e's weights on its block of rows; ``act`` must be elementwise.

    x: [A, D] sorted by expert; counts: E ints (sum A); w1 [E, H, D], b1 [E, H], w2 [E, D_out, H],
    b2 [E, D_out]; all of one dtype (cast before calling under autocast). Returns [A, D_out].
    ``grad_buffers`` supplies the weight gradients' memory (reused across steps, see :mod:`.grad_buffers`).
    """
    if sum(counts) != x.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but x has {x.shape[0]} rows")
    return _ExpertMLPBlocks.apply(x.contiguous(), list(counts), act, w1, b1, w2, b2, grad_buffers)
