"""The ``vmoe`` command: LightningCLI (fit / validate / test / predict) plus a registry of extra commands.

    vmoe fit --config configs/quickstart.yaml
    vmoe test --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt --model.eval_capacity_factor 0.5
    vmoe visualize ...   (any EXTRA_COMMANDS entry; dispatched before LightningCLI parses anything)
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

from ..distributed import fsdp as _fsdp_expert_parallel  # noqa: F401  registers "fsdp_expert_parallel"
from ..distributed import strategy as _expert_parallel  # noqa: F401  registers trainer.strategy "ddp_expert_parallel"
from .callbacks import PredictionWriter
from .data.base import ImageDataModule
from .module import ImageClassifier

__all__ = ["main", "run", "VMoECLI", "EXTRA_COMMANDS", "EXTRA_HELP", "default_loggers", "explicit_model_keys"]

# name -> "module:function"; each function takes argv (list[str]) and is imported only when its command runs.
EXTRA_COMMANDS: dict[str, str] = {
    "visualize": "vmoe.viz.cli:visualize_main",
    "sweep": "vmoe.viz.cli:sweep_main",
    "flops": "vmoe.models.flops:main",
    "export": "vmoe.models.export:main", "fewshot": "vmoe.eval.cli:fewshot_main",
}
EXTRA_HELP: dict[str, str] = {
    "visualize": "Draw which patches each router kept, dropped, and sent to which expert.",
    "sweep": "Evaluate a checkpoint over a range of eval capacity factors and plot the curve.",
    "flops": "Count the FLOPs of a dense ViT and its V-MoE.",
    "export": "Export a checkpoint as a timm folder.", "fewshot": "Few-shot linear evaluation of a checkpoint.",
}
# Model arguments the CLI links from the DataModule; never taken from a checkpoint's hyper-parameters.
LINKED_FROM_DATA = ("num_classes", "img_size", "in_chans")
# Routing settings of the current command (config file, flags or defaults), never a checkpoint's.
COMMAND_ROUTING = ("eval_capacity_factor", "batch_priority")
# Model arguments that only choose the starting weights, and their "none" values.
STARTING_WEIGHTS = {"checkpoint_path": None, "pretrained": False, "upcycle_kwargs": None}


def load_extra_command(name: str) -> Callable[[list[str]], Any]:
    """Import the function behind an EXTRA_COMMANDS entry, or exit with a message saying what is missing."""
    target = EXTRA_COMMANDS[name]
    module_name, _, func_name = target.partition(":")
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


def explicit_model_keys(argv: Sequence[str]) -> set[str] | None:
    """Model arguments given explicitly on the command line (``--model.X v`` / ``--model.X=v``,
    ``--model.init_args.X``); None when the whole ``--model`` is given, meaning all of them."""
    keys: set[str] = set()
    for token in argv:
        if token == "--model" or token.startswith("--model="):
            return None
        if token.startswith("--model."):
            parts = token[len("--model."):].split("=", 1)[0].split(".")
            if parts[0] == "init_args" and len(parts) > 1:
                parts = parts[1:]
            keys.add(parts[0])
    return keys


def _next_version(root: Path) -> int:
    versions = [int(p.name.split("_")[1]) for p in root.glob("version_*")
                if p.is_dir() and p.name.split("_")[1].isdigit()]
    return max(versions, default=-1) + 1


def default_loggers(save_dir: str | os.PathLike) -> list[Logger]:
    """CSV logger, plus TensorBoard when it is installed, sharing <save_dir>/lightning_logs/version_N."""
    version = _next_version(Path(save_dir) / "lightning_logs")
    loggers: list[Logger] = [CSVLogger(save_dir, name="lightning_logs", version=version)]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir, name="lightning_logs", version=version, default_hp_metric=False))
    return loggers


class VMoECLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` and any :class:`ImageDataModule` subclass.

    On top of LightningCLI: a ModelCheckpoint (best by val/acc1 + last) configurable as ``--checkpoint.*``;
    ``vmoe predict`` writes a CSV (``--predictions.output``, default <log_dir>/predictions.csv);
    num_classes / img_size / in_chans linked from the DataModule; CSV (+ TensorBoard) logging under
    ``trainer.default_root_dir`` unless ``trainer.logger`` is set; hyper-parameters from ``--ckpt_path`` fill
    in the model arguments except those given explicitly on the command line and the evaluation routing
    settings (eval_capacity_factor, batch_priority: always the command's own, from its config or flags), where
    Lightning's own behaviour would let the checkpoint override them; the model is then built
    without its starting weights (checkpoint_path/pretrained/upcycle_kwargs), which ckpt_path replaces anyway.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        self._raw_argv = list(sys.argv[1:] if args is None else args)
        kwargs.setdefault("trainer_defaults", {"accelerator": "auto", "default_root_dir": "runs/default"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"prog": "vmoe", "description": "vmoe: train and evaluate vision "
                                            "Mixture-of-Experts on timm ViTs with Lightning."})
        super().__init__(ImageClassifier, ImageDataModule, subclass_mode_data=True,
                         args=None if args is None else list(args), **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults({"checkpoint.monitor": "val/acc1", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{epoch}-{step}"})
        for name in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Listed for `vmoe --help` only: main() dispatches these before LightningCLI parses anything.
        action = getattr(parser, "_subcommands_action", None)
        if action is not None:
            for name, help_text in EXTRA_HELP.items():
                if name in EXTRA_COMMANDS:
                    action.add_subcommand(name, LightningArgumentParser(description=help_text), help=help_text)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        explicit = explicit_model_keys(self._raw_argv)
        if explicit is None:
            return
        keep = {k: v for k, v in hparams.items()
                if not k.startswith("_") and k not in explicit and k not in LINKED_FROM_DATA + COMMAND_ROUTING}
        if keep:
            try:
                self.config = self.parser.parse_object({subcommand: {"model": keep}}, self.config)
            except SystemExit:
                sys.stderr.write(f"could not apply the hyper-parameters stored in {ckpt_path}\n")
                raise
        # Every weight comes from ckpt_path, so skip reading the starting weights (a dense checkpoint that may be
        # gone by now, or a hub download) unless asked for on the command line.
        for key, off in STARTING_WEIGHTS.items():
            if key not in explicit:
                self.config[subcommand]["model"][key] = off

    def after_fit(self) -> None:
        from .checkpoints_report import report_checkpoints  # where `vmoe fit` wrote its checkpoints

        report_checkpoints(self.trainer)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(trainer_cfg.get("default_root_dir") or os.getcwd())
        return super().instantiate_trainer(**kwargs)


def run(argv: Sequence[str] | None = None) -> Any:
    """Run a ``vmoe`` command; returns the finished VMoECLI (``.trainer``, ``.model``, ``.datamodule``) or
    whatever an extra command returns. ``argv`` defaults to sys.argv[1:]."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in EXTRA_COMMANDS:
        return load_extra_command(args[0])(args[1:])
    return VMoECLI(args=argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmoe`` console script (exit status 0 on success; errors raise or exit)."""
    result = run(argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
