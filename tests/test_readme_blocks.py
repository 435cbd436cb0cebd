"""The README's Python blocks run as a user would paste them, against small stand-in files: released-checkpoint
names written in the reference's format (the real image and patch sizes, a tiny width) and converted by the
README's own `vmoe convert` commands. A block that uses an undefined name or a file nobody makes fails here."""
import re
import shlex
from pathlib import Path

import pytest
import torch

from reference_writer import random_tree, write_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
PYTHON = re.findall(r"^```python\n(.*?)^```", TEXT, re.S | re.M)
BASH = re.findall(r"^```bash\n(.*?)^```", TEXT, re.S | re.M)
TINY = dict(dim=16, heads=2, mlp=32, depth=8, moe_layers=(5, 7), experts=8, patch=32)
# The released checkpoints the README's blocks name: (image size, classes, representation, ensemble size).
STAND_INS = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": (384, 1000, None, 1),
    "eee_s32_last2_ilsvrc2012_ft_cifar100": (128, 100, 16, 2),
}


def _commands(program: str) -> list[list[str]]:
    """The README's shell commands that start with ``program`` (backslash continuations joined)."""
    lines = "\n".join(BASH).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0])[1:] for line in lines if line.startswith(program + " ")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from vmoe.cli import main

    root = tmp_path_factory.mktemp("readme")
    for name, (img, classes, rep, ensemble) in STAND_INS.items():
        tree = random_tree(img=img, classes=classes, representation=rep, ensemble=ensemble, **TINY)
        (root / "ckpts").mkdir(exist_ok=True)
        write_checkpoint(root / "ckpts" / name, tree)
    cwd = Path.cwd()
    try:
        import os
        os.chdir(root)
        for args in _commands("vmoe convert"):
            assert main(args) == 0, args
    finally:
        os.chdir(cwd)
    return root


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON) >= 5 and _commands("vmoe convert")
    named = set(re.findall(r"ckpts/(\w+)", "\n".join(PYTHON + BASH)))
    assert named <= set(STAND_INS), f"give these README checkpoints a stand-in: {named - set(STAND_INS)}"


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_readme_python_block_runs_as_written(index, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    code = PYTHON[index]
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"{README}:python block {index + 1}", "exec"), namespace)  # noqa: S102
    if "local-dir:converted" in code:  # the converted model computes what load_reference does, in eval mode
        from vmoe.models import load_reference

        source = load_reference("ckpts/vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012", group_size=1160,
                                capacity_factor=1.5, bfloat16_dispatch=True)
        x = torch.rand(8, 3, 384, 384) * 2 - 1
        with torch.no_grad():
            for model in (namespace["model"], namespace["same"]):
                assert not model.training
                torch.testing.assert_close(model(x), source(x))


def test_the_released_checkpoint_table_is_the_registrys():
    from vmoe.models.timm_names import RELEASES

    for release in RELEASES.values():  # each row: the command test_models_releases.py runs, and the load line
        row = next((line for line in TEXT.splitlines() if line.startswith(f"| `{release.checkpoint}` |")), "")
        assert f"`{release.convert_command()}`" in row and f"`{release.load_line()}`" in row, release.checkpoint
        assert f"| {release.img_size} / {release.num_classes} | {release.group_size} |" in row
