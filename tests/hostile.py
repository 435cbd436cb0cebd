"""Helpers of the hostile-input tests: run the vmoe CLI as a user would, in a subprocess, optionally under an
address-space limit (a memory bomb then fails fast with MemoryError instead of swapping the machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _limit_address_space(limit_bytes: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


def run_python(code: str, *, address_space_gib: float | None = None, timeout: float = 240
               ) -> subprocess.CompletedProcess:
    """``python -c CODE`` with this checkout on the path, optionally under an address-space limit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VMOE_DEBUG", None)
    limit = _limit_address_space(int(address_space_gib * 2**30)) if address_space_gib else None
    return subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=timeout,
                          preexec_fn=limit)


def run_vmoe(args: list[str], *, cwd: str | os.PathLike | None = None, address_space_gib: float | None = None,
             timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``vmoe ARGS`` from this checkout in a fresh interpreter; stdout/stderr captured as text."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("VMOE_DEBUG", None)
    limit = _limit_address_space(int(address_space_gib * 2**30)) if address_space_gib else None
    return subprocess.run([sys.executable, "-m", "vmoe", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=limit)
