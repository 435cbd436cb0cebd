"""Read a checkpoint written by the JAX V-MoE reference (``<prefix>.index`` + ``<prefix>.data-*``).

Only ``msgpack`` and numpy: no JAX, flax or TensorFlow. The byte format (MessagePack with ext types 1
ndarray, 6 SliceNd, 8 IndexInfo) is described in tests/data/vmoe_reference/README.md. Arrays come back
keyed by their flax path joined with "/" (e.g. ``Encoder/encoderblock_1/Moe/Router/dense/kernel``).

bfloat16 arrays (numpy has no such dtype) are returned as float32 holding exactly the same values: the
16 stored bits become the upper half of a float32 (``uint16 << 16``), which is how bfloat16 is defined.

The index is not trusted: every declared shape, slice, dtype and data-file count is checked against the
bytes that exist (see :mod:`.reader_checks`) before anything is allocated, and every error names the file
and the array.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .reader_checks import (ArrayInfo, ReferenceCheckpointError, check_array_info, check_declared_bytes,
                            check_slice, data_file_names, numpy_dtype, to_native)

__all__ = ["read_reference_checkpoint", "read_reference_index", "resolve_checkpoint_prefix", "ArrayInfo",
           "ReferenceCheckpointError"]

_CHUNK_MARKER = "__msgpack_array_chunk_a87ca2__"
_EXT_NDARRAY, _EXT_SLICE_ND, _EXT_INDEX_INFO = 1, 6, 8
_KNOWN_VERSIONS = (None, "20220622")


def _msgpack():
    try:
        import msgpack
    except ImportError as err:  # pragma: no cover - msgpack is a dependency
        raise ImportError("reading V-MoE reference checkpoints needs the 'msgpack' package "
                          "(pip install msgpack)") from err
    return msgpack


def _unpack(data: bytes, path: Path, ext_hook=None, what: str = "") -> Any:
    msgpack = _msgpack()
    kwargs = dict(raw=False, strict_map_key=False)
    if ext_hook is not None:
        kwargs["ext_hook"] = ext_hook
    try:
        return msgpack.unpackb(data, **kwargs)
    except msgpack.ExtraData as err:
        raise ReferenceCheckpointError(f"{path}{what}: {len(err.extra)} extra bytes after the MessagePack object "
                                       "(not a reference checkpoint file?)") from err
    except (ValueError, msgpack.UnpackException, TypeError, IndexError) as err:
        if isinstance(err, ReferenceCheckpointError):
            raise
        raise ReferenceCheckpointError(f"{path}{what}: not a valid reference checkpoint file (truncated or foreign "
                                       f"MessagePack data: {type(err).__name__}: {err})") from err


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path.read_bytes()


def _raw_slice(payload: bytes, path: Path) -> list:
    """A SliceNd as it is stored: one [start, stop, step] per axis (checked by check_slice, which knows the array)."""
    axes = _unpack(payload, path)
    if not isinstance(axes, (list, tuple)):
        raise ReferenceCheckpointError(f"{path}: a SliceNd holds a {type(axes).__name__}, expected a list of slices")
    return [_unpack(packed, path) if isinstance(packed, bytes) else packed for packed in axes]


def _index_hook(path: Path):
    def hook(code: int, data: bytes):
        if code != _EXT_INDEX_INFO:
            raise ReferenceCheckpointError(f"{path}: unexpected MessagePack ext type {code} in the index "
                                           f"(expected {_EXT_INDEX_INFO}, IndexInfo)")
        fields = _unpack(data, path)
        if not isinstance(fields, (list, tuple)) or len(fields) != 3:
            raise ReferenceCheckpointError(f"{path}: an IndexInfo holds {fields!r:.80}, expected [shape-and-dtype, "
                                           "slices, shards]")
        shaped, slices, shards = fields
        # [shape, dtype, weak_type, named_shape-or-{}]: the fourth field is ignored (both versions).
        shaped = _unpack(shaped, path) if isinstance(shaped, bytes) else shaped
        if not isinstance(shaped, (list, tuple)) or len(shaped) < 2:
            raise ReferenceCheckpointError(f"{path}: an IndexInfo's shape field is {shaped!r:.80}")
        raw_slices = [_raw_slice(s, path) for s in slices] if isinstance(slices, (list, tuple)) else slices
        return ("__info__", shaped[0], shaped[1], raw_slices, shards)

    return hook


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, tuple]]:
    """Depth-first over the nested maps, keys in code-point order: JAX's leaf numbering."""
    if isinstance(tree, tuple) and tree and tree[0] == "__info__":
        yield prefix, tree
        return
    if not isinstance(tree, dict):
        raise ReferenceCheckpointError(f"index entry {prefix or '<root>'} is a {type(tree).__name__}, expected "
                                       "a map or an IndexInfo")
    for key in sorted(tree, key=str):
        yield from _leaves(tree[key], f"{prefix}/{key}" if prefix else str(key))


_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_PREFIX_HELP = ("a checkpoint prefix is the path without its suffixes: ckpts/NAME for ckpts/NAME.index + "
                "ckpts/NAME.data-00000-of-00001 (the .index file or the folder holding exactly one checkpoint "
                "work too)")


def resolve_checkpoint_prefix(path: str | os.PathLike) -> Path:
    """The prefix of a reference checkpoint given as its prefix, its ``.index`` or ``.data-*`` file, or a
    folder holding exactly one ``*.index``. Raises FileNotFoundError (nothing there) or ValueError (a
    folder with several checkpoints), saying what a prefix is."""
    given = Path(path)
    if Path(f"{os.fspath(given)}.index").is_file():
        return given
    if given.is_file() and given.suffix == ".index":
        return given.with_suffix("")
    if given.is_file() and _DATA_SUFFIX.search(given.name):
        return given.with_name(_DATA_SUFFIX.sub("", given.name))
    if given.is_dir():
        found = sorted(given.glob("*.index"))
        if len(found) == 1:
            return found[0].with_suffix("")
        if found:
            raise ValueError(f"{given} holds {len(found)} checkpoints ({[f.stem for f in found]}): pass one "
                             f"prefix, e.g. {found[0].with_suffix('')}")
        raise FileNotFoundError(f"{given} is a folder without any <prefix>.index file; {_PREFIX_HELP}")
    raise FileNotFoundError(f"no checkpoint at {given}: {given}.index does not exist; {_PREFIX_HELP}")


def read_reference_index(prefix: str | os.PathLike) -> tuple[list[ArrayInfo], int]:
    """The arrays described by ``<prefix>.index`` in leaf-number order, and the number of data files.

    Each array's shape, dtype, chunk slices and data-file numbers are checked (ReferenceCheckpointError
    naming the index and the array); whether the data files exist and hold that many bytes is checked by
    :func:`read_reference_checkpoint`. ``prefix``: anything :func:`resolve_checkpoint_prefix` takes.
    """
    path = Path(f"{os.fspath(resolve_checkpoint_prefix(prefix))}.index")
    index = _unpack(_read_bytes(path, "checkpoint index"), path, _index_hook(path))
    if not isinstance(index, dict) or "index" not in index or "shard_count" not in index:
        keys = sorted(index, key=str) if isinstance(index, dict) else type(index).__name__
        raise ReferenceCheckpointError(f"{path}: not a reference checkpoint index (expected a map with "
                                       f"'index' and 'shard_count', got {keys})")
    version = index.get("version")
    if version not in _KNOWN_VERSIONS:
        raise ReferenceCheckpointError(f"{path}: unknown checkpoint format version {version!r}; "
                                       f"this reader knows {_KNOWN_VERSIONS}")
    count = index["shard_count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ReferenceCheckpointError(f"{path}: shard_count must be a positive int, got {count!r}")
    infos = [check_array_info(path, name, shape, dtype, slices, shards, count)
             for name, (_, shape, dtype, slices, shards) in _leaves(index["index"])]
    return infos, count


def _data_hook(path: Path):
    def hook(code: int, data: bytes):
        if code == _EXT_SLICE_ND:
            return ("__slice__", _raw_slice(data, path))
        if code == _EXT_NDARRAY:
            fields = _unpack(data, path)
            if not isinstance(fields, (list, tuple)) or len(fields) != 3:
                raise ReferenceCheckpointError(f"{path}: an ndarray holds {fields!r:.80}, expected [shape, dtype, "
                                               "bytes]")
            return ("__array__", *fields)  # decoded by _chunk_values, which knows the array
        raise ReferenceCheckpointError(f"{path}: unexpected MessagePack ext type {code} in a data file "
                                       f"(expected {_EXT_NDARRAY} or {_EXT_SLICE_ND})")
    return hook


def _to_float32_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_reference_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of the checkpoint at ``prefix`` (``<prefix>.index``, ``<prefix>.data-NNNNN-of-MMMMM``).

    Returns {flax path joined by "/": numpy array (native byte order)} in leaf order. Chunks may be split
    along any axes and spread over any of the data files; every element must be written exactly once.
    bfloat16 arrays come back as float32 with identical values. Raises FileNotFoundError naming a missing
    file and ReferenceCheckpointError (a ValueError) naming the file and the array for truncated, foreign or
    inconsistent data, a dtype it does not read, or sizes the data files cannot hold (checked before any
    array is allocated).
    ``prefix`` may also be the ``.index`` file or the folder holding the checkpoint.
    """
    prefix = resolve_checkpoint_prefix(prefix)
    infos, count = read_reference_index(prefix)
    names = data_file_names(prefix, count)
    check_declared_bytes(prefix, infos, [Path(name).stat().st_size for name in names])
    arrays = {i: np.empty(info.shape, dtype=numpy_dtype(info.dtype, info.path)) for i, info in enumerate(infos)}
    written = {i: np.zeros(info.shape, dtype=bool) for i, info in enumerate(infos)}
    for name in names:
        path = Path(name)
        data = _unpack(path.read_bytes(), path, _data_hook(path))
        if not isinstance(data, dict) or data.get(_CHUNK_MARKER) is not True:
            raise ReferenceCheckpointError(f"{path}: not a reference checkpoint data file (no "
                                           f"{_CHUNK_MARKER!r} marker)")
        for key, chunks in data.items():
            if key == _CHUNK_MARKER:
                continue
            _place(path, key, chunks, infos, arrays, written)
    for i, info in enumerate(infos):
        if not written[i].all():
            raise ReferenceCheckpointError(
                f"array {info.path} {info.shape}: {int((~written[i]).sum())} of {written[i].size} elements are "
                f"in no chunk of the data files of {os.fspath(prefix)}")
    out = {}
    for i, info in enumerate(infos):
        out[info.path] = _to_float32_bits(arrays[i]) if info.dtype == "bfloat16" else to_native(arrays[i])
    return out


def _chunk_values(path: Path, info: ArrayInfo, subchunks: Any) -> np.ndarray:
    """The elements of one chunk (its subchunk arrays concatenated, flat) in the index's dtype."""
    if not isinstance(subchunks, (list, tuple)):
        raise ReferenceCheckpointError(f"{path}: chunk of {info.path} holds a {type(subchunks).__name__}, expected "
                                       "a list of arrays")
    dtype = numpy_dtype(info.dtype, info.path)
    parts = []
    for sub in subchunks:
        if not (isinstance(sub, tuple) and sub[0] == "__array__"):
            raise ReferenceCheckpointError(f"{path}: chunk of {info.path} holds a non-array subchunk")
        _, shape, sub_dtype, raw = sub
        if sub_dtype != info.dtype:
            raise ReferenceCheckpointError(f"{path}: chunk of {info.path} is {sub_dtype}, the index says {info.dtype}")
        if (not isinstance(shape, (list, tuple)) or not isinstance(raw, bytes)
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape)):
            raise ReferenceCheckpointError(f"{path}: a subchunk of {info.path} has shape {shape!r:.80} (expected "
                                           "non-negative ints) or no bytes")
        size = 1
        for n in shape:
            size *= n
        if len(raw) != size * dtype.itemsize:
            raise ReferenceCheckpointError(f"{path}: a subchunk of {info.path} of shape {list(shape)} ({info.dtype}) "
                                           f"needs {size * dtype.itemsize} bytes, it holds {len(raw)}")
        parts.append(np.frombuffer(raw, dtype=dtype))
    if not parts:
        return np.empty(0, dtype=dtype)
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def _place(path: Path, key: Any, chunks: Any, infos: list[ArrayInfo], arrays: dict, written: dict) -> None:
    try:
        leaf = int(key)
    except (TypeError, ValueError):
        raise ReferenceCheckpointError(f"{path}: key {key!r} is not a leaf number") from None
    if not 0 <= leaf < len(infos):
        raise ReferenceCheckpointError(f"{path}: leaf {leaf} is not in the index ({len(infos)} arrays)")
    info = infos[leaf]
    if not isinstance(chunks, (list, tuple)):
        raise ReferenceCheckpointError(f"{path}: the chunks of {info.path} are a {type(chunks).__name__}, "
                                       "expected a list")
    for chunk in chunks:
        if not isinstance(chunk, (list, tuple)) or len(chunk) != 2 or not isinstance(chunk[1], tuple) \
                or chunk[1][0] != "__slice__":
            raise ReferenceCheckpointError(f"{path}: a chunk of {info.path} is not [arrays, SliceNd]")
        subchunks, (_, raw_bounds) = chunk
        bounds = check_slice(path, info.path, info.shape, raw_bounds)
        values = _chunk_values(path, info, subchunks)
        shape = tuple(stop - start for start, stop in bounds)
        if values.size != int(np.prod(shape, dtype=np.int64)):
            raise ReferenceCheckpointError(f"{path}: chunk {bounds} of {info.path} holds {values.size} values, "
                                           f"its slice needs {int(np.prod(shape, dtype=np.int64))}")
        where = tuple(slice(start, stop) for start, stop in bounds)
        if written[leaf][where].any():
            raise ReferenceCheckpointError(f"{path}: chunk {bounds} of {info.path} overlaps another chunk")
        arrays[leaf][where] = values.reshape(shape)
        written[leaf][where] = True
