"""The LightningCLI commands of ``vmoe`` (fit / validate / test / predict); :mod:`vmoe.cli` holds the table of
every command and dispatches these four here.

    vmoe fit --config configs/quickstart.yaml
    vmoe test --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt --model.eval_capacity_factor 0.5
    python -m vmoe.train.cli fit ...   (the same, these four commands only)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from ..distributed import fsdp as _fsdp_expert_parallel  # noqa: F401  registers "fsdp_expert_parallel"
from ..distributed import strategy as _expert_parallel  # noqa: F401  registers trainer.strategy "ddp_expert_parallel"
from ..errors import DEBUG_ENV, UsageError, exit_status
from .callbacks import LastCheckpoint, PredictionWriter
from .cli_errors import VMoEArgumentParser, innermost_cause
from .config_layers import dropped_callbacks
from .from_checkpoint import STARTING_WEIGHTS, classifier_hparams, read_lightning_checkpoint
from .data.base import ImageDataModule
from .module import ImageClassifier
from .quiet import quiet_lightning
from .resume import ResumeStateCheckpoint
from .run_layout import default_loggers, evaluation_log_root

__all__ = ["main", "run", "VMoECLI", "UsageError", "DEBUG_ENV", "LIGHTNING_COMMANDS", "default_loggers",
           "explicit_model_keys"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Model arguments the CLI links from the DataModule; never taken from a checkpoint's hyper-parameters.
LINKED_FROM_DATA = ("num_classes", "img_size", "in_chans")
# Routing settings an evaluating command takes from itself (config file, flags or defaults), never from the
# checkpoint it evaluates. A resumed fit takes every routing setting from its checkpoint.
COMMAND_ROUTING = ("eval_capacity_factor", "batch_priority")
# Hyper-parameters that decide how a resumed fit routes: a flag may not change them silently.
TRAINING_ROUTING = ("k", "capacity_factor", "eval_capacity_factor", "batch_priority", "noise_std", "group_size",
                    "bfloat16_dispatch", "router")


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


# Values of --ckpt_path that Lightning resolves itself (not file paths).
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
# Subcommands that evaluate weights: without --ckpt_path (or starting weights) they need --allow_random_weights.
EVALUATING = ("validate", "test", "predict")


class VMoECLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` and any :class:`ImageDataModule` subclass.

    On top of LightningCLI: a ModelCheckpoint keeping the best by val/acc1 (``--checkpoint.*``) and
    ``last.ckpt`` = the latest state, written every epoch and at the end of fit (``--last_checkpoint.*``);
    checkpoints carry the random states and the training loader's position (exact resume); ``vmoe predict``
    writes a CSV (``--predictions.output``, default <log_dir>/predictions.csv); num_classes / img_size /
    in_chans linked from the DataModule; CSV (+ TensorBoard) logging under ``trainer.default_root_dir`` unless
    ``trainer.logger`` is set, validate/test/predict next to the checkpoint they evaluate (``run_layout``); no
    abbreviated options, one-line errors naming the closest valid options and the short help (``cli_errors``,
    ``cli_help``). ``--ckpt_path`` is checked before anything runs (a
    missing, damaged or non-Lightning file is named with the cause); its hyper-parameters fill in the model
    arguments except those given explicitly on the command line and the evaluation routing settings
    (eval_capacity_factor, batch_priority: always the command's own), and the model is built without its
    starting weights (checkpoint_path/pretrained/upcycle_kwargs), which ckpt_path replaces anyway.
    validate/test/predict refuse to evaluate random weights unless ``--allow_random_weights true``.

    Only public LightningCLI hooks are overridden (init_parser, add_arguments_to_parser, parse_arguments,
    before_instantiate_classes, instantiate_trainer); Lightning's own reading of the checkpoint's
    hyper-parameters is kept out by holding ckpt_path back between parse_arguments and
    before_instantiate_classes.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        self._raw_argv = list(sys.argv[1:] if args is None else args)
        self._held_ckpt_path: str | None = None
        kwargs.setdefault("trainer_defaults", {"accelerator": "auto", "default_root_dir": "runs/default"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # One-line errors naming the closest valid options, and the short help (cli_errors, cli_help).
        kwargs.setdefault("parser_class", VMoEArgumentParser)
        kwargs.setdefault("parser_kwargs", {
            "prog": "vmoe", "description": "vmoe: train and evaluate vision Mixture-of-Experts on timm ViTs with "
                                           "Lightning.",
            "epilog": "vmoe --help lists every command (visualize, sweep, flops, ... beside these)."})
        # The console script passes sys.argv[1:] itself: hand Lightning None then, which it reads from sys.argv
        # anyway, instead of a copy it warns about ("not recommended to provide both args and command line").
        same_as_argv = args is not None and list(args) == sys.argv[1:]
        super().__init__(ImageClassifier, ImageDataModule, subclass_mode_data=True,
                         args=None if args is None or same_as_argv else list(args), **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch must not pass for --trainer.max_epochs
        return super().init_parser(**kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            # A class that fails to build (a data folder without a train split, a bad model argument) reaches
            # here wrapped by jsonargparse in "Does not validate against any of the Union subtypes ...": report
            # the cause itself.
            cause = innermost_cause(err)
            if cause is err:
                raise
            raise cause from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(ResumeStateCheckpoint, "resume_state")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults({"checkpoint.monitor": "val/acc1", "checkpoint.mode": "max",
                             "checkpoint.filename": "best-{epoch}-{step}"})
        parser.add_argument("--allow_random_weights", type=bool, default=False,
                            help="validate/test/predict: evaluate the model as initialised when no --ckpt_path "
                                 "(or model.checkpoint_path / model.pretrained) gives its weights")
        for name in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        for message in dropped_callbacks(self._raw_argv):  # before parsing: --print_config exits inside it
            rank_zero_warn(message)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in LIGHTNING_CKPT_KEYWORDS:
            self._checkpoint = read_lightning_checkpoint(ckpt_path)
            # Held back so that LightningCLI does not apply the checkpoint's hyper-parameters over the command's.
            self._held_ckpt_path = str(ckpt_path)
            self.config[subcommand]["ckpt_path"] = None

    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        quiet_lightning(subcommand)
        if subcommand is None:
            return
        config = self.config[subcommand]
        if "weights_only" in config and config["weights_only"] is None:
            # our checkpoints hold tensors and plain containers only: no full-pickle load of a --ckpt_path
            config["weights_only"] = True
        if config.get("checkpoint", {}).get("save_last"):
            rank_zero_warn("--checkpoint.save_last is switched off: last.ckpt is written by --last_checkpoint (the "
                           "latest state every epoch), while save_last would only copy each new best")
            config["checkpoint"]["save_last"] = False
        if self._held_ckpt_path is None:
            model = config["model"]
            _resolve_checkpoint_path(model, config.get("config") or [])
            if (subcommand in EVALUATING and not config.get("allow_random_weights")
                    and not model.get("checkpoint_path") and not model.get("pretrained")):
                raise UsageError("no weights to evaluate: pass --ckpt_path "
                                 "<a .ckpt written by vmoe fit> (or --model.checkpoint_path for network weights); "
                                 "to evaluate the randomly initialised model on purpose, pass "
                                 "--allow_random_weights true")
            return
        config["ckpt_path"] = self._held_ckpt_path
        _check_sharded_checkpoint_fits(self._held_ckpt_path, config.get("trainer", {}).get("strategy"))
        hparams = self._checkpoint.get("hyper_parameters", {})
        explicit = explicit_model_keys(self._raw_argv)
        if explicit is None:
            return
        command_routing = COMMAND_ROUTING if subcommand in EVALUATING else ()
        if subcommand == "fit":
            model = config["model"]
            changed = {k: (hparams[k], model[k]) for k in TRAINING_ROUTING
                       if k in explicit and k in hparams and k in model and hparams[k] != model[k]}
            if changed:
                raise UsageError(
                    "a resumed fit keeps its checkpoint's routing, but "
                    + ", ".join(f"--model.{k} {new!r} (checkpoint: {old!r})" for k, (old, new) in changed.items())
                    + f" would change it; drop the flag(s) to resume {self._held_ckpt_path}, or start a new fit from "
                    "its weights with --model.checkpoint_path")
        keep = {k: v for k, v in classifier_hparams(hparams, keep=explicit).items()
                if k not in explicit and k not in LINKED_FROM_DATA + command_routing}
        if keep:
            try:
                self.config = self.parser.parse_object({subcommand: {"model": keep}}, self.config)
            except SystemExit:
                sys.stderr.write(f"could not apply the hyper-parameters stored in {self._held_ckpt_path}\n")
                raise
        # Every weight comes from ckpt_path, so skip reading the starting weights (a dense checkpoint that may be
        # gone by now, or a hub download) unless asked for on the command line.
        for key, off in STARTING_WEIGHTS.items():
            if key not in explicit:
                self.config[subcommand]["model"][key] = off
        self._checkpoint = {}  # the weights are read again by Lightning; do not hold two copies

    def _refuse_reset_head(self) -> None:
        network = getattr(self.model, "model", None)
        if (self._held_ckpt_path is None and getattr(network, "reset_head", False)
                and not self.config[self.subcommand].get("allow_random_weights")):
            path = self.config[self.subcommand]["model"].get("checkpoint_path")
            raise UsageError(f"model.checkpoint_path {path} has a classifier for another number of classes than the "
                             f"data's {network.num_classes}: its head was reset to random weights, so this would "
                             "evaluate an untrained classifier. Fine-tune first (vmoe fit, then --ckpt_path "
                             "<its last.ckpt>), or pass --allow_random_weights true to evaluate it anyway")

    before_validate = before_test = before_predict = _refuse_reset_head

    def after_fit(self) -> None:
        from .checkpoints_report import report_checkpoints  # where `vmoe fit` wrote its checkpoints

        report_checkpoints(self.trainer)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            root = trainer_cfg.get("default_root_dir") or os.getcwd()
            if self.subcommand in EVALUATING:  # next to the evaluated checkpoint: the next fit keeps its version_N
                model = self.config[self.subcommand]["model"]
                weights = model.get("checkpoint_path") or ("pretrained" if model.get("pretrained") else "initial")
                kwargs["logger"] = default_loggers(*evaluation_log_root(self.subcommand, self._held_ckpt_path, root,
                                                                        weights=weights))
            else:
                kwargs["logger"] = default_loggers(root)
        return super().instantiate_trainer(**kwargs)

    def _report_log_dir(self) -> None:
        if self.trainer.is_global_zero and self.trainer.log_dir:
            print(f"logs: {self.trainer.log_dir}")

    after_validate = after_test = after_predict = _report_log_dir


def _resolve_checkpoint_path(model: dict[str, Any], config_files: Sequence[Any]) -> None:
    """A relative model.checkpoint_path that is not there from the working directory is looked up next to the
    --config files (the last one holding it wins, as later configs override earlier ones): what `vmoe convert`
    writes into model.yaml, so a converted folder can be moved."""
    path = model.get("checkpoint_path")
    if not path or Path(path).is_absolute() or Path(path).exists():
        return
    found = [Path(os.fspath(c)).parent / path for c in config_files if (Path(os.fspath(c)).parent / path).exists()]
    if not found:
        folders = [str(Path(os.fspath(c)).parent) for c in config_files]
        raise UsageError(f"model.checkpoint_path {path!r} does not exist, neither from the working directory "
                         f"{os.getcwd()} nor from the folders of the --config files {folders}")
    model["checkpoint_path"] = str(found[-1])


def _check_sharded_checkpoint_fits(ckpt_path: str, strategy: Any) -> None:
    """A sharded (DCP) checkpoint directory loads only through a strategy that writes them; anything else would
    end in Lightning's IsADirectoryError, so say what to do instead."""
    from ..distributed.dcp import is_sharded_checkpoint

    if not is_sharded_checkpoint(ckpt_path):
        return
    def field(obj: Any, key: str) -> Any:  # a dict from a YAML file or a jsonargparse Namespace from flags
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    if field(field(strategy, "init_args"), "state_dict_type") == "sharded":
        return
    raise UsageError(f"--ckpt_path {ckpt_path} is a sharded (DCP) checkpoint directory, which loads only with an "
                     "expert-parallel strategy with state_dict_type: sharded (--trainer.strategy "
                     f"{strategy!r} here); or merge it into one file first: vmoe consolidate {ckpt_path} "
                     f"{ckpt_path.rstrip('/')}.full.ckpt")


def run(argv: Sequence[str] | None = None) -> VMoECLI:
    """Run a LightningCLI command (``argv`` starts with fit/validate/test/predict; default sys.argv[1:]);
    returns the finished VMoECLI (``.trainer``, ``.model``, ``.datamodule``)."""
    return VMoECLI(args=argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmoe.train.cli``: :func:`run` with exit status 0 on success, 2 for a usage error, 1 for any
    other error, printed as one ``vmoe CMD: error: <message>`` line (see :func:`vmoe.errors.exit_status`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    name = next((f"vmoe {a}" for a in args if a in LIGHTNING_COMMANDS), "vmoe")
    return exit_status(name, lambda: run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
