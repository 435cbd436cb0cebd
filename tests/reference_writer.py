"""A small writer of the JAX V-MoE reference's checkpoint format, for test cases the shared fixtures lack.

Follows tests/data/vmoe_reference/README.md (the format is described in the shared fixture README):
one MessagePack object per file; ext 8 IndexInfo in the index, ext 1 ndarray and ext 6 SliceNd in the
data files; leaves numbered depth-first with keys in code-point order.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Mapping, Sequence

import msgpack
import numpy as np

Chunk = tuple[tuple[int, int], ...]


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _slice_nd(bounds: Chunk) -> bytes:
    return _pack([_pack([start, stop, None]) for start, stop in bounds])


def _nest(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path in sorted(flat):  # code-point order, as the reference's writer stores the maps
        node = tree
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = flat[path]
    return tree


def grid_chunks(shape: Sequence[int], splits: Sequence[int]) -> list[Chunk]:
    """Tile ``shape`` into a grid with ``splits[i]`` (nearly equal) pieces along axis i."""
    edges = [np.linspace(0, n, s + 1).round().astype(int) for n, s in zip(shape, splits)]
    return [tuple((int(e[i]), int(e[i + 1])) for e, i in zip(edges, idx))
            for idx in itertools.product(*[range(s) for s in splits])]


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")


def write_checkpoint(prefix: str | Path, arrays: Mapping[str, np.ndarray], *, num_shards: int = 1,
                     chunks: Mapping[str, Sequence[Chunk]] | None = None, shard_of=None,
                     versioned: bool = True, bfloat16: Sequence[str] = (), subchunks: int = 1,
                     named_shape: bool = False, dtypes: Mapping[str, str] | None = None,
                     declared: Mapping[str, Mapping[str, object]] | None = None,
                     shard_count: int | None = None) -> None:
    """Write ``arrays`` ({path: float32 array}) at ``prefix``.

    chunks: path -> chunk bounds (default: one chunk); shard_of(leaf, chunk_index) -> data file
    (default: round robin over chunks); versioned=False writes the older index without "version" and,
    with named_shape, a non-empty named_shape map; bfloat16: paths stored as bfloat16 (their float32
    values are truncated to the upper 16 bits); subchunks: split each chunk's elements in that many 1-D parts.
    Hostile files: dtypes: path -> a numpy dtype string the bytes are stored in and named by (e.g. ">f4");
    declared: path -> index fields that lie ("shape", "dtype", "slices": raw [start, stop, step] per axis per
    chunk); shard_count: the count the index declares (the files written are still ``num_shards``).
    """
    dtypes, declared = dict(dtypes or {}), dict(declared or {})
    prefix = str(prefix)
    chunks = dict(chunks or {})
    names = sorted(arrays)
    layout = {}
    counter = itertools.count()
    for leaf, path in enumerate(names):
        bounds = chunks.get(path) or [tuple((0, n) for n in arrays[path].shape)]
        shards = [shard_of(leaf, i) if shard_of else next(counter) % num_shards for i in range(len(bounds))]
        layout[path] = (bounds, shards)
    data_files: list[dict] = [{"__msgpack_array_chunk_a87ca2__": True} for _ in range(num_shards)]
    index_leaves = {}
    for leaf, path in enumerate(names):
        array = arrays[path]
        dtype = "bfloat16" if path in bfloat16 else dtypes.get(path, "float32")
        bounds, shards = layout[path]
        fourth = {"experts": 4} if named_shape else {}
        lie = declared.get(path, {})
        shaped = _pack([list(lie.get("shape", array.shape)), lie.get("dtype", dtype), False, fourth])
        slices = ([_pack([_pack(list(axis)) for axis in chunk]) for chunk in lie["slices"]] if "slices" in lie
                  else [_slice_nd(b) for b in bounds])
        index_leaves[path] = msgpack.ExtType(8, _pack([shaped, slices, shards]))
        for b, shard in zip(bounds, shards):
            part = array[tuple(slice(s, e) for s, e in b)]
            stored = "<f4" if dtype == "float32" else dtype
            flat = _bf16_bits(part).reshape(-1) if dtype == "bfloat16" else np.ascontiguousarray(part, stored).reshape(-1)
            pieces = np.array_split(flat, subchunks)
            subs = [msgpack.ExtType(1, _pack([[p.size], dtype, p.tobytes()])) for p in pieces]
            data_files[shard].setdefault(str(leaf), []).append([subs, msgpack.ExtType(6, _slice_nd(b))])
    index = {"index": _nest(index_leaves), "shard_count": num_shards if shard_count is None else shard_count}
    if versioned:
        index["version"] = "20220622"
    Path(f"{prefix}.index").write_bytes(_pack(index))
    for i, content in enumerate(data_files):
        Path(f"{prefix}.data-{i:05d}-of-{num_shards:05d}").write_bytes(_pack(content))


def random_tree(*, depth: int = 2, dim: int = 8, heads: int = 2, mlp: int = 16, patch: int = 2, img: int = 4,
                moe_layers: Sequence[int] = (1,), experts: int = 4, ensemble: int = 1, classes: int = 3,
                token: bool = True, representation: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A random reference params tree of the given architecture (flax paths and layouts)."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    d = dim // heads
    tokens = (img // patch) ** 2 + int(token)
    out = {"embedding/kernel": r(patch, patch, 3, dim), "embedding/bias": r(dim),
           "Encoder/posembed_input/pos_embedding": r(1, tokens, dim),
           "Encoder/encoder_norm/scale": 1 + r(dim), "Encoder/encoder_norm/bias": r(dim)}
    if token:
        out["cls"] = r(1, 1, dim)
    width = representation or dim
    if representation:
        out["pre_logits/kernel"], out["pre_logits/bias"] = r(dim, representation), r(representation)
    out["head/kernel"], out["head/bias"] = r(width, classes), r(classes)
    for i in range(depth):
        b = f"Encoder/encoderblock_{i}"
        for j in (0, 1):
            out[f"{b}/LayerNorm_{j}/scale"], out[f"{b}/LayerNorm_{j}/bias"] = 1 + r(dim), r(dim)
        for n in ("query", "key", "value"):
            out[f"{b}/SelfAttention/{n}/kernel"], out[f"{b}/SelfAttention/{n}/bias"] = r(dim, heads, d), r(heads, d)
        out[f"{b}/SelfAttention/out/kernel"], out[f"{b}/SelfAttention/out/bias"] = r(heads, d, dim), r(dim)
        if i in moe_layers:
            router = r(dim, experts, scale=1.0)
            out[f"{b}/Moe/Router/dense/kernel"] = router.reshape(dim, ensemble, experts // ensemble) if ensemble > 1 \
                else router
            out[f"{b}/Moe/Mlp/Dense_0/kernel"], out[f"{b}/Moe/Mlp/Dense_0/bias"] = r(experts, dim, mlp), r(experts, mlp)
            out[f"{b}/Moe/Mlp/Dense_1/kernel"], out[f"{b}/Moe/Mlp/Dense_1/bias"] = r(experts, mlp, dim), r(experts, dim)
        else:
            out[f"{b}/Mlp/Dense_0/kernel"], out[f"{b}/Mlp/Dense_0/bias"] = r(dim, mlp), r(mlp)
            out[f"{b}/Mlp/Dense_1/kernel"], out[f"{b}/Mlp/Dense_1/bias"] = r(mlp, dim), r(dim)
    return out
