"""The top floor: `vmoe --help` lists every command at once without heavy imports; a misspelled command gets
the closest names in one line; each command is imported only when it runs."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from vmoe import cli
from vmoe.cli import COMMANDS, Command, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "timm", "jsonargparse", "numpy", "matplotlib")


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def _imported(importtime_stderr: str) -> list[str]:
    """Module names from `python -X importtime` lines: 'import time: self | cumulative | <indent>name'."""
    return [line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2 and "imported package" not in line]


def test_help_is_a_table_of_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert any(line.split()[:1] == [name] and command.help in line for line in out.splitlines()), name
    assert set(COMMANDS) == {"fit", "validate", "test", "predict", "visualize", "sweep", "flops", "convert",
                             "export", "consolidate", "fewshot"}


def test_top_level_help_imports_no_heavy_package():
    proc = _python("-X", "importtime", "-m", "vmoe", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fewshot" in proc.stdout and "visualize" in proc.stdout
    modules = _imported(proc.stderr)
    assert "vmoe.cli" in modules  # the parsing sees the imports
    heavy = sorted({m.split(".")[0] for m in modules} & set(HEAVY))
    assert not heavy, f"vmoe --help imported {heavy}"
    # the interpreter's start-up plus a handful of stdlib modules; torch alone brings hundreds
    assert len(modules) < 150, f"{len(modules)} modules imported: {sorted(modules)}"


def test_the_import_parser_sees_heavy_imports():
    proc = _python("-X", "importtime", "-c", "import json")
    assert "json" in _imported(proc.stderr) and "json.decoder" in _imported(proc.stderr)


@pytest.mark.parametrize("typo, expected", [("fitt", "fit"), ("vizualize", "visualize"), ("swep", "sweep"),
                                            ("exprt", "export"), ("fewshots", "fewshot"), ("--hlep", "--help")])
def test_a_misspelled_command_gets_the_closest_names(typo, expected, capsys):
    if expected == "--help":
        expected = "valid: fit"  # an unknown option: the valid commands, no guess among them
    assert main([typo]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and err[0].startswith("vmoe: error: unknown"), err
    assert typo in err[0] and expected in err[0]
    if expected != "valid: fit":
        assert f"did you mean {expected}" in err[0]


def test_a_word_far_from_every_command_lists_them_all(capsys):
    assert main(["xyzzy"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and all(name in err for name in COMMANDS)


def test_no_command_prints_the_table_and_fails(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "commands:" in err and "no command given" in err


def test_commands_dispatch_lazily_with_their_arguments(monkeypatch):
    calls = []
    fake = types.ModuleType("fake_vmoe_command")
    fake.run = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fake_vmoe_command", fake)
    monkeypatch.setitem(COMMANDS, "hello", Command("Say hello.", "fake_vmoe_command:run"))
    monkeypatch.setitem(COMMANDS, "lit", Command("Lightning-like.", "fake_vmoe_command:run", lightning=True))
    assert main(["hello", "--x", "1"]) == 7 and calls == [["--x", "1"]]
    assert main(["lit", "--y"]) == 7 and calls[-1] == ["lit", "--y"]  # the name stays for LightningCLI
    monkeypatch.setitem(COMMANDS, "broken", Command("?", "no_such_module_vmoe:run"))
    with pytest.raises(SystemExit, match="vmoe broken: cannot import no_such_module_vmoe"):
        main(["broken"])
    monkeypatch.setitem(COMMANDS, "nofunc", Command("?", "fake_vmoe_command:missing"))
    with pytest.raises(SystemExit, match="has no function 'missing'"):
        main(["nofunc"])


def test_every_target_names_a_function_of_its_module():
    # importing every command module is the slow part; the names alone are checked against the source
    for name, command in COMMANDS.items():
        module, _, func = command.target.partition(":")
        path = ROOT / Path(*module.split(".")).with_suffix(".py")
        assert path.is_file(), (name, path)
        assert f"def {func}(" in path.read_text(), (name, command.target)


def test_convert_help_imports_no_lightning():
    # sys.modules, not -X importtime: the command module comes through importlib.import_module, which importtime
    # does not report
    code = ("import sys\nfrom vmoe.cli import main\ntry:\n    main(['convert', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(' '.join(sorted(sys.modules)), file=sys.stderr)")
    proc = _python("-c", code)
    assert "--out" in proc.stdout, proc.stderr[-2000:]
    modules = proc.stderr.split()
    assert "vmoe.models.jax_checkpoint.cli" in modules and "timm" in modules
    assert not [m for m in modules if m.split(".")[0] == "lightning"]


def test_python_dash_m_vmoe_runs_the_same_main():
    assert cli.main is sys.modules["vmoe.cli"].main
    assert (ROOT / "vmoe" / "__main__.py").read_text().count("from vmoe.cli import main") == 1
