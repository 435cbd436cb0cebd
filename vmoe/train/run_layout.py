"""Where a ``vmoe`` command writes its logs: ``fit`` into the next ``lightning_logs/version_N`` of
``trainer.default_root_dir``; validate/test/predict next to the checkpoint they evaluate, so that evaluating
never shifts the version number of the next fit.

    runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt     (vmoe fit)
    runs/quickstart/lightning_logs/version_0/eval/test-last/version_0  (vmoe test --ckpt_path .../last.ckpt)
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger

__all__ = ["default_loggers", "evaluation_log_root", "next_version"]


def next_version(root: Path) -> int:
    """1 + the largest N of the ``version_N`` folders in ``root`` (0 when there is none)."""
    versions = [int(p.name.split("_")[1]) for p in root.glob("version_*")
                if p.is_dir() and p.name.split("_")[1].isdigit()]
    return max(versions, default=-1) + 1


def default_loggers(save_dir: str | os.PathLike, name: str = "lightning_logs") -> list[Logger]:
    """CSV logger, plus TensorBoard when it is installed, sharing <save_dir>/<name>/version_N."""
    version = next_version(Path(save_dir) / name)
    loggers: list[Logger] = [CSVLogger(save_dir, name=name, version=version)]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir, name=name, version=version, default_hp_metric=False))
    return loggers


def evaluation_log_root(subcommand: str, ckpt_path: str | None, default_root_dir: str | os.PathLike,
                        weights: str = "initial") -> tuple[Path, str]:
    """(save_dir, name) of the loggers of an evaluating command: ``<run>/eval``, with ``<run>`` the folder
    above the checkpoint's ``checkpoints/`` (else the checkpoint's own folder), and the name
    ``<subcommand>-<checkpoint file stem>``. Without a checkpoint file (starting weights or random weights):
    ``<default_root_dir>/eval`` and ``<subcommand>-<weights>`` (e.g. the stem of model.checkpoint_path)."""
    if ckpt_path and Path(ckpt_path).is_file():
        ckpt = Path(ckpt_path)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return run_dir / "eval", f"{subcommand}-{ckpt.stem}"
    return Path(default_root_dir) / "eval", f"{subcommand}-{Path(str(ckpt_path or weights)).stem}"
