"""atomic_folder: a multi-file output appears as a whole or not at all; killed writers' leftovers are removed."""
import os

import pytest

from vmoe import io_folder
from vmoe.io import temp_name
from vmoe.io_folder import atomic_folder


def _write(folder, **files):
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_new_content_replaces_the_folder_and_keeps_other_entries(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(io_folder, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and not out.exists()
        _write(tmp, **{"model.safetensors": "w1", "config.json": "c1"})
    assert not tmp.exists() and sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    (out / "README.md").write_text("mine")  # added by the user
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("a")
    with atomic_folder(out) as tmp:
        _write(tmp, **{"model.safetensors": "w2", "config.json": "c2"})
        assert (out / "config.json").read_text() == "c1"  # untouched until the block ends
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == {
        "model.safetensors": "w2", "config.json": "c2", "README.md": "mine"}
    assert (out / "notes" / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_an_error_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        _write(tmp, **{"config.json": "old"})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(out) as tmp:
            _write(tmp, **{"config.json": "new", "model.safetensors": "half"})
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["config.json"] and (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = temp_name(out).with_name(temp_name(out).name.replace(f".{os.getpid()}.", ".999999999."))
    dead.mkdir()
    (dead / "model.safetensors").write_text("half")
    live = temp_name(out)  # this process: still writing
    live.mkdir()
    old_style = tmp_path / "out" / ".save_pretrained.999999999.abcd"  # what save_pretrained used to leave inside
    old_style.mkdir(parents=True)
    with atomic_folder(out) as tmp:
        _write(tmp, **{"config.json": "c"})
    assert not dead.exists() and live.exists() and not old_style.exists()
    assert sorted(os.listdir(out)) == ["config.json"]


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match="out exists and is not a folder"):
        with atomic_folder(tmp_path / "out"):
            pass


def test_the_current_folder_and_symlinks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is the current folder or one above it"):
        with atomic_folder("."):
            pass
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_folder(tmp_path / "link") as tmp:
        _write(tmp, **{"config.json": "c"})
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "config.json").read_text() == "c"
