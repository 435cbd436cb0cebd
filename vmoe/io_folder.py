"""Atomic folder writes: a multi-file output (``vmoe convert``, ``vmoe export``, ``save_pretrained``) appears as a
whole or not at all.

The files are written into a hidden sibling folder (named like :mod:`vmoe.io`'s temporary files, so a killed
run's leftover is recognised and removed by the next write of the same folder), which then takes the place of
the target: in one step where the file system can exchange two names (Linux ``renameat2(RENAME_EXCHANGE)``),
otherwise by two renames, between which the folder is absent rather than mixed. Entries of an existing target
folder that the new content does not hold (a README someone added) are carried over, as hard links.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .io import remove_stale_temp_files, temp_name

__all__ = ["atomic_folder"]

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step; False when this system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), f"{a} <-> {b}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _is_temp_leftover(name: str) -> bool:
    # vmoe.io temporary files and the per-process folders older save_pretrained versions wrote inside the target
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".save_pretrained."))


def _carry_over(old: Path, new: Path) -> None:
    for entry in os.scandir(old):
        if _is_temp_leftover(entry.name) or (new / entry.name).exists() or (new / entry.name).is_symlink():
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(new / entry.name))


def new_temp_folder(path: str | os.PathLike) -> Path:
    """A fresh hidden sibling folder of ``path`` to write a new version of it into (a killed run's leftovers of
    ``path`` are removed first); :func:`replace_folder` puts it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    tmp = temp_name(path)
    tmp.mkdir()
    return tmp


def replace_folder(tmp: Path, path: Path, *, keep_others: bool = True) -> None:
    """Put the finished folder ``tmp`` at ``path`` in one step (``renameat2`` exchange, else two renames).

    ``keep_others``: entries of an existing ``path`` that ``tmp`` does not have are carried over (a README
    beside converted weights); False replaces the folder as a whole (a checkpoint; a file at ``path`` is
    replaced too). ``tmp`` is gone after.
    """
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        if path.is_dir() and not path.is_symlink():
            if keep_others:
                _carry_over(path, tmp)
            if not _exchange(tmp, path):
                old = temp_name(path)
                os.rename(path, old)
                os.rename(tmp, path)
                tmp = old
        elif path.exists() or path.is_symlink():
            if keep_others:
                raise NotADirectoryError(f"{path} exists and is not a folder; choose another output folder")
            old = temp_name(path)
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
        else:
            os.rename(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp: <write files into tmp>``: on success ``tmp`` becomes ``out`` (other
    entries of an existing ``out`` kept); on error, or if the process is killed, ``out`` is left as it was and
    the temporary folder is removed (by this call, or by the next atomic_folder of ``out``)."""
    path = Path(path).resolve()  # a symlinked folder: its target is replaced, the link stays
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; choose another output folder")
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise ValueError(f"{path} is the current folder or one above it; the output replaces the whole folder, so "
                         "give it a folder of its own (e.g. --out converted/NAME)")
    tmp = new_temp_folder(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
