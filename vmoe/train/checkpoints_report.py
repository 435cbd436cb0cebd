"""The last lines of ``vmoe fit``: where the checkpoints and logs went, and how to use them."""
from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from .callbacks import LastCheckpoint

__all__ = ["checkpoint_lines", "report_checkpoints"]


def checkpoint_lines(trainer: Trainer, log_dir: str | None = None) -> list[str]:
    """One line per ModelCheckpoint (folder, best, last) plus the log dir (default ``trainer.log_dir``);
    empty when nothing was saved."""
    lines = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            continue
        lines.append(f"checkpoints: {callback.dirpath}")
        if callback.best_model_path:
            score = callback.best_model_score
            shown = f" ({callback.monitor}={float(score):.4f})" if score is not None and callback.monitor else ""
            lines.append(f"  best: {callback.best_model_path}{shown}")
        if callback.last_model_path:
            lines.append(f"  last: {callback.last_model_path}")
    # last.ckpt comes from LastCheckpoint (ModelCheckpoint's save_last only follows new bests in Lightning 2.6)
    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint) and callback.last_path is not None:
            lines.append(f"  last: {callback.last_path}")
    log_dir = log_dir or trainer.log_dir
    if lines and log_dir:
        lines.append(f"logs and config.yaml: {log_dir}")
    return lines


def report_checkpoints(trainer: Trainer) -> None:
    """Print :func:`checkpoint_lines` once (global rank 0). Call it on every rank."""
    # trainer.log_dir is a broadcast under DDP-like strategies: every rank joins it, or rank 0 waits on
    # ranks that have already returned and fails after a finished fit.
    log_dir = trainer.log_dir
    if trainer.is_global_zero:
        for line in checkpoint_lines(trainer, log_dir):
            print(line, flush=True)
