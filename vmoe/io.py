"""Atomic file writes: every file vmoe writes (weights, predictions, tables, figures) goes through here.

A reader never sees a half-written file: the data goes to a hidden temporary file in the same directory,
which is renamed over the target once complete. The new file gets the mode any new file would get
(0666 minus the umask), not the 0600 of ``tempfile.mkstemp``. A writer killed mid-write leaves its
temporary file behind; later writes of the same target remove such leftovers.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_path", "stale_temp_files", "remove_stale_temp_files", "temp_name", "STALE_AFTER_S"]

_HOST = socket.gethostname().replace(".", "_")
# A temporary file of another host (shared file system) counts as stale only after this long, since we
# cannot ask that host whether its writer is still alive.
STALE_AFTER_S = 24 * 3600.0


def temp_name(path: Path) -> Path:
    """A hidden sibling of ``path`` naming this host and process (what stale_temp_files recognises)."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of earlier writes of ``path`` whose writer is gone: its process no longer runs (same
    host), or the file is older than STALE_AFTER_S (other host, or a name without host and pid)."""
    path = Path(path)
    out = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:-len(".tmp")].split(".")
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if len(parts) == 3 and parts[0] == _HOST and parts[1].isdigit():
            pid = int(parts[1])
            if pid == os.getpid() or _pid_alive(pid):
                continue
            out.append(tmp)
        elif age > STALE_AFTER_S:
            out.append(tmp)
    return out


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of killed writers of ``path`` (files, or folders of a folder write); returns them."""
    stale = stale_temp_files(path)
    for leftover in stale:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return stale


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (by any library); on success it is renamed to
    ``path`` with the usual new-file mode; on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path, "w", newline="") as f: ...``: an open file whose content replaces ``path``
    only when the block ends without error (mode "w" or "wb")."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
