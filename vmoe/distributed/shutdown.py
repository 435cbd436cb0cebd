"""Destroy the process groups before the interpreter shuts down.

Lightning destroys the process group at exit for NCCL only. With gloo (CPU runs, and the expert-parallel
all-to-all groups), the default group and every ``new_group`` stay alive into interpreter finalization; their
C++ worker threads still hold work objects whose tensors refer to Python objects, and tearing those down
while the interpreter is being dismantled aborts the process (``terminate called without an active
exception``, SIGABRT, exit 134) after a run that trained and saved normally, depending on the order in which
things happen to be freed. Destroying every group from an ``atexit`` handler, while the interpreter is still
whole, stops and joins those threads first.
"""
from __future__ import annotations

import atexit

import torch.distributed as dist

__all__ = ["destroy_process_groups", "destroy_process_groups_at_exit"]

_registered = False


def destroy_process_groups() -> None:
    """Destroy the default process group and all groups made from it (no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_groups_at_exit() -> None:
    """Register :func:`destroy_process_groups` to run at interpreter exit (once per process)."""
    global _registered
    if not _registered:
        atexit.register(destroy_process_groups)
        _registered = True
