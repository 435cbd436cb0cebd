"""Checks of a reference checkpoint's index against the bytes that exist, before anything is allocated.

An index is a promise about the data files: shapes, dtypes, chunk slices and how many files there are.
A damaged or hostile index can promise a 95 GiB array, a billion data files or a negative dimension;
these checks compare each promise with what is on disk (file count, file sizes) and refuse it with a
message naming the file and the array, so that no allocation is ever sized by an unchecked number.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["ArrayInfo", "ReferenceCheckpointError", "check_array_info", "check_slice", "numpy_dtype", "to_native",
           "data_file_names", "check_declared_bytes", "READABLE_DTYPES"]

# Element kinds the reader stores as numbers: bool, signed/unsigned integers, floats (plus "bfloat16").
_KINDS = "biuf"
READABLE_DTYPES = "bfloat16, float16/32/64, int8..64, uint8..64, bool (optionally with a byte order: '>f4', '<f4')"


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint file is missing, truncated, foreign or inconsistent (the message names it)."""


@dataclass(frozen=True)
class ArrayInfo:
    """One array of the index: its path, full shape, dtype name and where its chunks are.

    slices: one tuple of (start, stop) per axis per chunk; shards: the data file of each chunk.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    slices: tuple[tuple[tuple[int, int], ...], ...]
    shards: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the array takes (Python ints: no overflow, whatever the index declares)."""
        size = numpy_dtype(self.dtype, self.path).itemsize
        for n in self.shape:
            size *= n
        return size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def numpy_dtype(name: Any, array: str) -> np.dtype:
    """The numpy dtype the bytes of ``array`` are stored in. A name without byte order ("float32", as the
    reference writes) is little-endian; an explicit one (">f4") is honoured. bfloat16: its raw 16 bits."""
    if name == "bfloat16":
        return np.dtype("<u2")  # raw bits, widened to float32 once the array is complete
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ReferenceCheckpointError(f"array {array}: unsupported dtype {name!r} in the checkpoint; this reader "
                                       f"reads {READABLE_DTYPES}")
    return dtype.newbyteorder("<") if dtype.byteorder in "=|" else dtype


def to_native(array: np.ndarray) -> np.ndarray:
    """``array`` in this machine's byte order (a copy only when the stored order differs)."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def check_slice(path: Path, array: str, shape: tuple[int, ...], raw: Any) -> tuple[tuple[int, int], ...]:
    """((start, stop) per axis) of a stored SliceNd [[start, stop, step], ...] of ``array``; each axis must
    satisfy 0 <= start <= stop <= size with step 1 (or None)."""
    ok = isinstance(raw, (list, tuple)) and len(raw) == len(shape)
    bounds = []
    for axis in raw if ok else ():
        if not (isinstance(axis, (list, tuple)) and len(axis) == 3):
            ok = False
            break
        start, stop, step = axis
        bounds.append((start, stop))
        ok = ok and step in (None, 1) and _is_int(start) and _is_int(stop)
    if ok and all(0 <= start <= stop <= n for (start, stop), n in zip(bounds, shape)):
        return tuple(bounds)
    raise ReferenceCheckpointError(f"{path}: array {array}: chunk slice {raw!r:.120} does not fit its shape "
                                   f"{list(shape)} (one [start, stop, step] per axis with 0 <= start <= stop <= "
                                   "size and step 1)")


def check_array_info(path: Path, name: str, shape: Any, dtype: Any, slices: Any, shards: Any,
                     count: int) -> ArrayInfo:
    """The ArrayInfo of one IndexInfo entry of the index ``path``, every field checked."""
    if not isinstance(shape, (list, tuple)) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ReferenceCheckpointError(f"{path}: array {name} has shape {shape!r:.120}; a shape is a list of "
                                       "non-negative ints")
    shape = tuple(shape)
    numpy_dtype(dtype, f"{name} (in {path})")
    if not isinstance(slices, (list, tuple)) or not isinstance(shards, (list, tuple)):
        raise ReferenceCheckpointError(f"{path}: array {name}: its chunk slices and data files must be lists, got "
                                       f"{type(slices).__name__} and {type(shards).__name__}")
    if len(slices) != len(shards) or any(not _is_int(s) or not 0 <= s < count for s in shards):
        raise ReferenceCheckpointError(f"{path}: array {name} has {len(slices)} chunks but data files "
                                       f"{list(shards)[:20]} (valid data files: 0..{count - 1})")
    bounds = tuple(check_slice(path, name, shape, raw) for raw in slices)
    return ArrayInfo(name, shape, dtype, bounds, tuple(shards))


def data_file_names(prefix: str | os.PathLike, count: int) -> list[str]:
    """The ``count`` data file names of ``prefix``, after checking that they exist; the directory is listed
    first, so that an index declaring a billion files is refused without making a billion names."""
    prefix = os.fspath(prefix)
    folder, base = os.path.split(prefix)
    start, end = f"{base}.data-", f"-of-{count:05d}"
    try:
        present = {entry for entry in os.listdir(folder or ".") if entry.startswith(start) and entry.endswith(end)}
    except (FileNotFoundError, NotADirectoryError):
        present = set()
    limit = count if len(present) >= count else len(present) + 1  # a missing one is among the first len+1
    missing = [n for n in range(limit) if f"{base}.data-{n:05d}{end}" not in present]
    if missing:
        first = [f"{prefix}.data-{n:05d}{end}" for n in missing[:5]]
        raise FileNotFoundError(f"checkpoint data file(s) missing: {first} (the index {prefix}.index lists {count} "
                                f"data files; {len(present)} exist)")
    return [f"{prefix}.data-{n:05d}{end}" for n in range(count)]


def check_declared_bytes(prefix: str | os.PathLike, infos: Sequence[ArrayInfo], sizes: Sequence[int]) -> None:
    """Refuse an index whose arrays need more bytes than their data files hold (``sizes``: bytes of each data
    file): per array against the files its chunks are in, and all arrays together against all files."""
    prefix = os.fspath(prefix)
    for info in infos:
        available = sum(sizes[s] for s in set(info.shards))
        if info.nbytes > available:
            files = [f"{prefix}.data-{s:05d}-of-{len(sizes):05d}" for s in sorted(set(info.shards))[:3]]
            raise ReferenceCheckpointError(
                f"{prefix}.index: array {info.path} declares shape {list(info.shape)} ({info.dtype}), "
                f"{info.nbytes:,} bytes, but the data file(s) {files} of its {len(info.slices)} chunk(s) hold "
                f"{available:,} bytes in all: the index is damaged or belongs to other data files")
    need, have = sum(info.nbytes for info in infos), sum(sizes)
    if need > have:
        largest = sorted(infos, key=lambda info: -info.nbytes)[:3]
        raise ReferenceCheckpointError(
            f"{prefix}.index: its arrays declare {need:,} bytes, the {len(sizes)} data file(s) hold {have:,}; the "
            f"largest: {[(info.path, list(info.shape)) for info in largest]}: the index is damaged or belongs to "
            "other data files")
