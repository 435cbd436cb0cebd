"""The ``vmoe`` command line: one table of commands, each imported only when it runs.

    vmoe --help                      the table below, without importing torch, timm or Lightning
    vmoe fit --config configs/quickstart.yaml
    vmoe sweep --ckpt_path runs/.../last.ckpt --out runs/sweep

Every command is a ``"module:function"`` target taking the arguments after the command name; the LightningCLI
commands (fit, validate, test, predict) go to :func:`vmoe.train.cli.run` with their name first. This module sits
above every package and imports them only through the table, when a command runs.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import DEBUG_ENV, UsageError, exit_status

__all__ = ["Command", "COMMANDS", "main", "run", "load_command", "usage", "DEBUG_ENV", "UsageError"]


@dataclass(frozen=True)
class Command:
    help: str  # one line, shown by `vmoe --help`
    target: str  # "module:function"; the function takes the argv after the command name
    lightning: bool = False  # a LightningCLI subcommand: the function takes the command name first


_LIGHTNING = "vmoe.train.cli:run"
COMMANDS: dict[str, Command] = {
    "fit": Command("Train a model (LightningCLI: --config, --model.*, --data.*, --trainer.*).", _LIGHTNING, True),
    "validate": Command("Evaluate a checkpoint on the validation split.", _LIGHTNING, True),
    "test": Command("Evaluate a checkpoint on the test split (at any eval capacity factor, BPR on or off).",
                    _LIGHTNING, True),
    "predict": Command("Write a checkpoint's predictions on the test split to a CSV file.", _LIGHTNING, True),
    "visualize": Command("Draw which patches each router kept, dropped, and sent to which expert.",
                         "vmoe.viz.cli:visualize_main"),
    "sweep": Command("Evaluate a checkpoint over a range of eval capacity factors and plot the curve.",
                     "vmoe.viz.cli:sweep_main"),
    "flops": Command("Count the parameters and FLOPs of a dense ViT and its V-MoE (or of a training config's).",
                     "vmoe.train.flops_cli:main"),
    "convert": Command("Convert a JAX V-MoE / E³ checkpoint (PREFIX.index + PREFIX.data-*) to model.safetensors.",
                       "vmoe.models.jax_checkpoint.cli:convert_main"),
    "export": Command("Export a checkpoint of vmoe fit as a timm folder (config.json + model.safetensors) "
                      "or, with --format onnx, an ONNX model.",
                      "vmoe.train.export:main"),
    "consolidate": Command("Merge a sharded (DCP) checkpoint directory into one .ckpt for vmoe test/export.",
                           "vmoe.distributed.dcp:main"),
    "fewshot": Command("Few-shot linear evaluation of a checkpoint's frozen features.", "vmoe.eval.cli:fewshot_main"),
}
# LightningCLI's own options before the command (`vmoe --config full.yaml fit`, `vmoe --print_config fit ...`).
_LIGHTNING_OPTIONS = ("-c", "--config", "--print_config")


def usage() -> str:
    """The top-level help: every command with its one-line help."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items())
    return ("usage: vmoe COMMAND [options]   (vmoe COMMAND --help lists the options of COMMAND)\n\n"
            "Train and evaluate vision Mixture-of-Experts on timm ViTs with Lightning.\n\n"
            f"commands:\n{rows}\n")


def _unknown(word: str, valid: Sequence[str], what: str) -> UsageError:
    close = difflib.get_close_matches(word, valid, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UsageError(f"unknown {what} {word!r}; {hint}valid: {', '.join(valid)} (vmoe --help explains them)")


def load_command(name: str) -> Callable[[list[str]], Any]:
    """Import the function behind COMMANDS[name], or exit with a message saying what is missing."""
    module_name, _, func_name = COMMANDS[name].target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(f"vmoe {name}: cannot import {module_name} ({type(err).__name__}: {err}); this "
                         "installation does not provide the command") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SystemExit(f"vmoe {name}: {module_name} has no function {func_name!r}; this installation does not "
                         "provide the command")
    return func


class _StderrHandler(logging.Handler):
    """Writes each record to the sys.stderr of the moment (a StreamHandler keeps the stream it started with)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def show_vmoe_logs() -> None:
    """Let vmoe's INFO/WARNING lines (resampled embeddings, a reset head, an adapted patch embedding, upcycling)
    reach the command's output, as Lightning does for its own logger."""
    logger = logging.getLogger("vmoe")
    if not logger.handlers:
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run(argv: Sequence[str] | None = None) -> Any:
    """Run ``vmoe ARGV``: the command's result (for fit/validate/test/predict the finished VMoECLI, with
    ``.trainer``, ``.model``, ``.datamodule``), 0 after ``--help``; raises UsageError for an unknown command."""
    args = sys.argv[1:] if argv is None else list(argv)
    first = args[0] if args else None
    if first in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    if first is None:
        sys.stderr.write(usage())
        raise UsageError("no command given")
    if first.split("=", 1)[0] in _LIGHTNING_OPTIONS:
        show_vmoe_logs()
        return load_command("fit")(args)  # LightningCLI reads its command after its own options
    if first not in COMMANDS:
        raise _unknown(first, list(COMMANDS), "option" if first.startswith("-") else "command")
    command = COMMANDS[first]
    show_vmoe_logs()
    return load_command(first)(args if command.lightning else args[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmoe`` console script and ``python -m vmoe``: exit status 0 on success, 2 for a
    usage error, 1 for any other error, printed as one ``vmoe CMD: error: <message>`` line (VMOE_DEBUG=1:
    the traceback)."""
    args = sys.argv[1:] if argv is None else list(argv)
    name = next((f"vmoe {a}" for a in args if a in COMMANDS), "vmoe")
    return exit_status(name, lambda: run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
