"""Reuse the memory of the stacked experts' weight gradients from one backward pass to the next, on CPU.

Why: training frees every gradient in ``zero_grad`` (``set_to_none=True``, PyTorch's and Lightning's default)
and backward allocates it again. A stacked expert weight's gradient is E times a dense layer's (151 MB for
E=64 at ViT-S/16 size), and glibc serves blocks over 32 MB with a fresh ``mmap`` each time, so every step
page-faults the whole gradient in again: on the machine of ``scripts/bench_moe.py`` that was 2.7 us per 4 KiB
page, 100 ms per step per MoE layer at E=32 and 200 ms at E=64. The CUDA caching allocator, jemalloc and
tcmalloc keep freed memory for reuse; glibc does not for blocks this big.

How: :class:`GradientBuffers` keeps the last buffer it handed out per weight and hands out its memory again
only when nothing else references it any more: the gradient was set to None and no view, copy or hook result
shares its storage (checked with the storage's reference count). Otherwise it allocates a fresh buffer. So
gradient accumulation (no ``zero_grad`` between backward passes), a kept ``p.grad`` or a layer used twice in
one graph behave exactly as without it.

Cost: between a backward pass and the next, the buffers stay allocated even when the gradients are None (as
the CUDA caching allocator keeps them reserved): the expert weights' size in memory once more, per MoE layer.
``StackedExperts.eval()`` and moving the module (``.to``) free them.
``StackedExperts(reuse_grad_memory=False)``, or ``experts.grad_buffers = None`` on a built model, turns it off.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GradientBuffers"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_refs(t: Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata)


class GradientBuffers:
    """Per-key gradient buffers whose memory is reused once their previous gradient is gone (CPU only)."""

    def __init__(self) -> None:
        self._buffers: dict[str, tuple[Tensor, int]] = {}

    @staticmethod
    def applies_to(like: Tensor) -> bool:
        """Reuse is worth it for CPU tensors only (CUDA's caching allocator already reuses), and not while
        torch.compile traces (the reference count is a runtime fact)."""
        return like.device.type == "cpu" and _use_count is not None and not torch.compiler.is_compiling()

    def empty_like(self, key: str, like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor shaped like ``like``, on reused memory when that is free.

        The result is a fresh tensor object over the buffer's storage, so autograd can take it as the
        parameter's ``.grad`` without copying.
        """
        if not self.applies_to(like):
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        held = self._buffers.get(key)
        if held is not None:
            buffer, alone = held
            if (buffer.shape == like.shape and buffer.dtype == like.dtype and buffer.device == like.device
                    and _storage_refs(buffer) == alone):
                return buffer.detach()
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._buffers[key] = (buffer, _storage_refs(buffer))
        return buffer.detach()

    def clear(self) -> None:
        """Drop the held buffers (their memory returns once the gradients using it are gone)."""
        self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)

    # Copies of a module (deepcopy for EMA weights, pickling) start without buffers: they are a cache.
    def __deepcopy__(self, memo) -> "GradientBuffers":
        return GradientBuffers()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}

    def __repr__(self) -> str:
        return f"GradientBuffers({sorted(self._buffers)})"
