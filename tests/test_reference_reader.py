"""read_reference_checkpoint: the real reference checkpoints bit-exactly, every layout the format allows
(written by tests/reference_writer.py), and clear errors for broken files."""
from pathlib import Path

import msgpack
import numpy as np
import pytest

from reference_writer import grid_chunks, random_tree, write_checkpoint
from vmoe.models import read_reference_checkpoint
from vmoe.models.jax_checkpoint import ReferenceCheckpointError, read_reference_index

DATA = Path(__file__).parent / "data" / "vmoe_reference"


def _assert_bit_exact(got: dict, want) -> None:
    assert sorted(got) == sorted(want.keys() if isinstance(want, dict) else want.files)
    for key in got:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert got[key].tobytes() == want[key].tobytes(), key


@pytest.mark.parametrize("name", ["tiny16", "rep32", "eee16"])
def test_reference_checkpoints_read_bit_exactly(name):
    got = read_reference_checkpoint(DATA / name / "ckpt")
    _assert_bit_exact(got, np.load(DATA / name / "params.npz"))
    infos, count = read_reference_index(DATA / name / "ckpt")
    assert count == {"tiny16": 1, "rep32": 2, "eee16": 1}[name]
    # eee16's expert arrays were written from 4 expert partitions: 4 chunks split along the expert axis
    moe = [info for info in infos if "/Moe/Mlp/" in info.path]
    assert moe and all(len(info.slices) == (4 if name == "eee16" else 1) for info in moe)


def test_leaf_numbers_follow_code_point_order_with_twelve_blocks(tmp_path):
    tree = random_tree(depth=12, moe_layers=(9, 11))
    write_checkpoint(tmp_path / "c", tree, num_shards=3)
    infos, _ = read_reference_index(tmp_path / "c")
    paths = [info.path for info in infos]
    assert paths == sorted(tree)  # code-point order: encoderblock_10 < encoderblock_11 < encoderblock_2
    first = [p.split("/")[1] for p in paths if p.startswith("Encoder/encoderblock_")]
    assert first.index("encoderblock_10") < first.index("encoderblock_2")
    _assert_bit_exact(read_reference_checkpoint(tmp_path / "c"), tree)


def test_chunks_split_along_inner_axes_over_several_files_with_subchunks(tmp_path):
    tree = random_tree(depth=2, moe_layers=(1,), experts=4, mlp=12)
    kernel = "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"  # [E=4, D=8, H=12]
    chunks = {kernel: grid_chunks(tree[kernel].shape, (2, 1, 3)),          # expert axis and the inner H axis
              "Encoder/posembed_input/pos_embedding": grid_chunks((1, 5, 8), (1, 2, 2))}
    # spread one array's chunks over all 3 files, out of order
    write_checkpoint(tmp_path / "c", tree, num_shards=3, chunks=chunks, shard_of=lambda leaf, i: (2 * i + leaf) % 3,
                     subchunks=3)
    infos, count = read_reference_index(tmp_path / "c")
    info = next(i for i in infos if i.path == kernel)
    assert count == 3 and len(info.slices) == 6 and set(info.shards) == {0, 1, 2}
    _assert_bit_exact(read_reference_checkpoint(tmp_path / "c"), tree)


def test_unversioned_index_with_named_shape(tmp_path):
    tree = random_tree()
    write_checkpoint(tmp_path / "c", tree, versioned=False, named_shape=True)
    assert "version" not in msgpack.unpackb((tmp_path / "c.index").read_bytes(), raw=False,
                                            ext_hook=lambda c, d: None, strict_map_key=False)
    _assert_bit_exact(read_reference_checkpoint(tmp_path / "c"), tree)


def test_bfloat16_arrays_become_float32_with_the_same_values(tmp_path):
    tree = random_tree()
    names = ["head/kernel", "Encoder/encoderblock_1/Moe/Mlp/Dense_1/kernel"]
    write_checkpoint(tmp_path / "c", tree, bfloat16=names, chunks={names[1]: grid_chunks(tree[names[1]].shape, (2, 2, 1))})
    got = read_reference_checkpoint(tmp_path / "c")
    for name in names:
        truncated = (tree[name].view(np.uint32) & 0xFFFF0000).view(np.float32)
        assert got[name].dtype == np.float32 and got[name].tobytes() == truncated.tobytes()
        assert not np.array_equal(truncated, tree[name])  # the test really lost bits
    assert got["embedding/kernel"].tobytes() == tree["embedding/kernel"].tobytes()


def test_missing_data_file_is_named(tmp_path):
    write_checkpoint(tmp_path / "c", random_tree(), num_shards=2)
    (tmp_path / "c.data-00001-of-00002").unlink()
    with pytest.raises(FileNotFoundError, match="c.data-00001-of-00002"):
        read_reference_checkpoint(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="nothere.index"):
        read_reference_checkpoint(tmp_path / "nothere")


@pytest.mark.parametrize("which", ["index", "data"])
def test_truncated_files_are_named(tmp_path, which):
    write_checkpoint(tmp_path / "c", random_tree())
    path = tmp_path / ("c.index" if which == "index" else "c.data-00000-of-00001")
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ReferenceCheckpointError, match=path.name):
        read_reference_checkpoint(tmp_path / "c")


def test_foreign_files_are_named(tmp_path):
    write_checkpoint(tmp_path / "c", random_tree())
    good_index = (tmp_path / "c.index").read_bytes()
    (tmp_path / "c.index").write_bytes(b'{"not": "msgpack"}\n')
    with pytest.raises(ReferenceCheckpointError, match="c.index"):
        read_reference_checkpoint(tmp_path / "c")
    (tmp_path / "c.index").write_bytes(msgpack.packb({"hello": 1}))
    with pytest.raises(ReferenceCheckpointError, match="c.index.*'index' and 'shard_count'"):
        read_reference_checkpoint(tmp_path / "c")
    (tmp_path / "c.index").write_bytes(good_index)
    (tmp_path / "c.data-00000-of-00001").write_bytes(msgpack.packb({"a": [1, 2], "pad": b"x" * 65536}))
    with pytest.raises(ReferenceCheckpointError, match="c.data-00000-of-00001.*marker"):
        read_reference_checkpoint(tmp_path / "c")


def test_chunks_that_do_not_cover_an_array_are_an_error(tmp_path):
    tree = random_tree()
    name = "head/kernel"  # [8, 3]
    write_checkpoint(tmp_path / "c", tree, chunks={name: [((0, 8), (0, 2))]})  # column 2 is in no chunk
    with pytest.raises(ReferenceCheckpointError, match="head/kernel.*8 of 24 elements are in no chunk"):
        read_reference_checkpoint(tmp_path / "c")
    write_checkpoint(tmp_path / "d", tree, chunks={name: [((0, 8), (0, 3)), ((0, 4), (0, 3))]})
    with pytest.raises(ReferenceCheckpointError, match="overlaps"):
        read_reference_checkpoint(tmp_path / "d")
