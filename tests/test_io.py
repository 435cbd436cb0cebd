"""The one atomic-write helper: whole files or nothing, the umask's mode, killed writers' leftovers removed."""
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vmoe.io import STALE_AFTER_S, atomic_path, atomic_write, stale_temp_files

ROOT = Path(__file__).resolve().parents[1]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_file_mode_follows_the_umask(tmp_path, umask_027):
    with atomic_write(tmp_path / "a.txt") as f:
        f.write("hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert _mode(tmp_path / "a.txt") == 0o640  # 0666 & ~027, not mkstemp's 0600
    os.umask(0o002)
    with atomic_write(tmp_path / "a.txt") as f:
        f.write("again")
    assert _mode(tmp_path / "a.txt") == 0o664


def test_save_weights_and_figures_honour_the_umask(tmp_path, umask_027):
    from matplotlib.figure import Figure

    from vmoe.models import save_weights
    from vmoe.viz.report import save_figure
    for name in ("w.safetensors", "w.pth"):
        save_weights(nn.Linear(2, 3), tmp_path / name)
        assert _mode(tmp_path / name) == 0o640, name
    save_figure(Figure(), tmp_path / "f.png")
    assert _mode(tmp_path / "f.png") == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(target, "a"):
            pass


KILLED_SAVE = """
import os, signal, sys
import safetensors.torch
from torch import nn
from vmoe.models import save_weights

def half_then_killed(state, path, metadata=None):
    open(path, "wb").write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = half_then_killed
save_weights(nn.Linear(2, 3), sys.argv[1])
"""


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    from vmoe.models import load_weights, save_weights
    target = tmp_path / "w.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], env=env, capture_output=True)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".w.safetensors.")]
    assert len(leftovers) == 1 and not target.exists()
    assert stale_temp_files(target) == leftovers  # its writer is dead
    model = nn.Linear(2, 3)
    save_weights(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    load_weights(nn.Linear(2, 3), target)


def test_temporaries_of_live_writers_and_fresh_foreign_ones_are_kept(tmp_path):
    target = tmp_path / "x.pth"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        assert stale_temp_files(target) == []  # our own, in progress
    foreign = tmp_path / ".x.pth.otherhost.123.abcd.tmp"
    foreign.write_bytes(b"x")
    old_style = tmp_path / ".x.pth.k2j3h4.tmp"  # tempfile.mkstemp's name, from earlier versions
    old_style.write_bytes(b"x")
    assert stale_temp_files(target) == []
    past = time.time() - STALE_AFTER_S - 60
    for p in (foreign, old_style):
        os.utime(p, (past, past))
    assert sorted(stale_temp_files(target)) == sorted([foreign, old_style])
    torch.save({}, tmp_path / "unrelated")
    with atomic_write(target, "wb") as f:
        f.write(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated", "x.pth"]


def test_every_writer_uses_the_helper():
    """No module writes through its own temp-file-and-rename any more (one helper, one behaviour)."""
    offenders = []
    for path in list((ROOT / "vmoe").rglob("*.py")) + list((ROOT / "scripts").rglob("*.py")):
        if path.name == "io.py" and path.parent.name == "vmoe":
            continue
        text = path.read_text()
        # temp-file-and-rename patterns; a scratch tempfile.TemporaryDirectory (removed on exit) is not one
        if "os.replace(" in text or "mkstemp" in text or "mkdtemp" in text or "NamedTemporaryFile" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
