"""A hostile or damaged reference checkpoint index: sizes are checked against the bytes that exist before
anything is allocated, byte order is honoured, and every error names the file and the array."""
import re

import numpy as np
import pytest

from hostile import run_python
from reference_writer import random_tree, write_checkpoint
from vmoe.models.jax_checkpoint import ReferenceCheckpointError, read_reference_checkpoint

def test_convert_memory_bombs_fail_fast_under_an_address_space_limit(tmp_path):
    """Each `vmoe convert` (the console entry point, in one fresh interpreter limited to 8 GiB of address space)
    is refused with a message naming the file and the array, before allocating what the index declares."""
    huge = {"head/kernel": {"shape": [160000, 160000], "slices": [[[0, 160000, None], [0, 160000, None]]]}}
    write_checkpoint(tmp_path / "huge", random_tree(), declared=huge)                # 95 GiB of float32
    write_checkpoint(tmp_path / "many", random_tree(), shard_count=10**9)            # a billion data files
    # the command's own imports (torch, timm) first: the timing below is the refusal's, not the import's
    code = ("import sys, time; from vmoe.cli import main\n"
            "import vmoe.models.checkpoint, vmoe.models.jax_checkpoint.cli, vmoe.models.jax_checkpoint.model\n"
            "for name in ('huge', 'many'):\n"
            "    t = time.perf_counter()\n"
            f"    rc = main(['convert', {str(tmp_path)!r} + '/' + name, '--out', {str(tmp_path)!r} + '/out'])\n"
            "    print(name, rc, round(time.perf_counter() - t, 1), file=sys.stderr)\n")
    proc = run_python(code, address_space_gib=8)
    assert proc.returncode == 0 and "MemoryError" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("vmoe convert:", "huge", "many"))]
    assert re.match(r"vmoe convert: error: .*huge.index: array head/kernel declares shape \[160000, 160000\] "
                    r"\(float32\), 102,400,000,000 bytes, but the data file\(s\) .*huge.data-00000-of-00001", lines[0])
    assert lines[1].startswith("huge 1 ") and float(lines[1].split()[2]) < 5, lines[1]
    assert re.match(r"vmoe convert: error: FileNotFoundError: checkpoint data file\(s\) missing: "
                    r"\[.*many.data-00000-of-1000000000'.*lists 1000000000 data files; 0 exist", lines[2]), lines[2]
    assert lines[3].startswith("many 1 ") and float(lines[3].split()[2]) < 5, lines[3]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lie, message", [
    (dict(declared={"head/kernel": {"shape": [8, -3]}}), r"c.index: array head/kernel has shape \[8, -3\]"),
    (dict(declared={"head/kernel": {"slices": [[[-1, 8, None], [0, 3, None]]]}}),
     r"c.index: array head/kernel: chunk slice .*-1, 8.* does not fit its shape \[8, 3\]"),
    (dict(declared={"head/kernel": {"slices": [[[0, 9, None], [0, 3, None]]]}}),
     r"c.index: array head/kernel: chunk slice .* does not fit its shape \[8, 3\]"),
    (dict(declared={"head/kernel": {"dtype": "complex64"}}), r"array head/kernel .*unsupported dtype 'complex64'"),
    (dict(declared={"head/kernel": {"dtype": "<U4"}}), r"array head/kernel .*unsupported dtype '<U4'"),
    (dict(declared={"head/kernel": {"dtype": "float64"}}), r"c.index: array head/kernel declares shape \[8, 3\] "
                                                           r"\(float64\), 192 bytes"),
])
def test_lying_index_entries_name_the_file_and_the_array(tmp_path, lie, message):
    tree = random_tree()
    write_checkpoint(tmp_path / "c", tree, **lie)
    if "float64" in message:  # a file too small for the declared dtype: shrink it so only the size check can catch it
        write_checkpoint(tmp_path / "c", {"head/kernel": tree["head/kernel"]}, **lie)
    with pytest.raises(ReferenceCheckpointError, match=message):
        read_reference_checkpoint(tmp_path / "c")


def test_chunk_in_a_data_file_with_a_lying_size_names_the_array(tmp_path):
    tree = random_tree()
    write_checkpoint(tmp_path / "c", tree, dtypes={"head/kernel": "<f4"}, declared={"head/kernel": {"dtype": "<f2"}})
    with pytest.raises(ReferenceCheckpointError, match=r"c.data-00000-of-00001: chunk of head/kernel is <f4, the "
                                                       r"index says <f2"):
        read_reference_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("dtype", [">f4", "<f4", ">f8", ">i4"])
def test_explicit_byte_order_is_honoured(tmp_path, dtype):
    tree = random_tree()
    if dtype == ">i4":
        tree["head/bias"] = np.array([1, -2, 70000], dtype=np.int64).astype(np.float32)
    write_checkpoint(tmp_path / "c", tree, dtypes={"head/kernel": dtype, "head/bias": dtype})
    raw = (tmp_path / "c.data-00000-of-00001").read_bytes()
    assert np.asarray(tree["head/kernel"], dtype).tobytes() in raw  # really stored in that byte order
    got = read_reference_checkpoint(tmp_path / "c")
    for name in ("head/kernel", "head/bias"):
        assert got[name].dtype.isnative and got[name].dtype == np.dtype(dtype).newbyteorder("=")
        np.testing.assert_array_equal(got[name], tree[name].astype(np.dtype(dtype)))
    assert float(np.abs(got["head/kernel"]).max()) < 10  # not 1e38: no byte-swapped garbage
