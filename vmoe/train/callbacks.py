"""Callbacks the `vmoe` CLI adds: ``last.ckpt`` = the latest state, and `vmoe predict` results as a CSV file."""
from __future__ import annotations

import csv
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from ..io import atomic_write

__all__ = ["PredictionWriter", "LastCheckpoint", "resume_command"]


def resume_command(last: str | Path, argv: Sequence[str] | None = None) -> str:
    """The ``vmoe fit`` command line that resumes the run of ``argv`` (default sys.argv[1:]) from ``last``:
    the same arguments with ``--ckpt_path`` replaced."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        kept.append(arg)
    return shlex.join(["vmoe", *kept, "--ckpt_path", str(last)])


class LastCheckpoint(Callback):
    """Write ``last.ckpt`` (the full training state) after every training epoch and at the end of ``fit``.

    last.ckpt thus always holds the latest state, whatever the best-by-metric ModelCheckpoint keeps.

    (Lightning's ``ModelCheckpoint(save_last=True)`` with a monitor rewrites last.ckpt only when it saves a
    new best.)

    Args:
        dirpath: Folder of last.ckpt; null = the ModelCheckpoint's folder (<log_dir>/checkpoints).
        filename: File name, ending in .ckpt.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"filename must be a file name ending in .ckpt, got {filename!r}")
        self.dirpath, self.filename = dirpath, filename
        self.last_path: Path | None = None
        self._saved_step: int | None = None
        self._mid_epoch_step: int | None = None

    def _directory(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        best = trainer.checkpoint_callback
        if best is not None and getattr(best, "dirpath", None):
            return Path(best.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def save(self, trainer: L.Trainer) -> Path:
        """Write the trainer's current state (collective: every rank must call it)."""
        path = self._directory(trainer) / self.filename
        trainer.save_checkpoint(path, weights_only=False)  # the full training state, said explicitly
        self.last_path, self._saved_step = path, trainer.global_step
        return path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Reaching max_steps inside an epoch: save here, where Lightning resumes mid-epoch. The epoch-end hooks
        # that follow would record the epoch as finished, and a longer resumed run would skip its rest.
        if 0 <= trainer.max_steps <= trainer.global_step and batch_idx + 1 < trainer.num_training_batches:
            self.save(trainer)
            self._mid_epoch_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._mid_epoch_step != trainer.global_step:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Any other stop inside an epoch (max_time, should_stop) still leaves steps no save has.
        if self._saved_step != trainer.global_step:
            self.save(trainer)


    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Ctrl-C: say what survives and how to go on (Lightning only says it shuts down).
        if not isinstance(exception, KeyboardInterrupt) or trainer.global_rank != 0:
            return
        if self.last_path is None or not self.last_path.is_file():
            print(f"\nvmoe fit interrupted at step {trainer.global_step}: no {self.filename} was written yet (it is "
                  "written at the end of every training epoch); nothing to resume from", file=sys.stderr, flush=True)
            return
        print(f"\nvmoe fit interrupted at step {trainer.global_step}; the latest saved state is {self.last_path} "
              f"(step {self._saved_step}). Resume with:\n  {resume_command(self.last_path)}",
              file=sys.stderr, flush=True)


class PredictionWriter(BasePredictionWriter):
    """After ``vmoe predict``, write one row per image: index, pred, prob (of pred), target (when known).

    Written atomically (temp file + rename). With several processes each writes its own file, suffixed by its
    global rank.

    Args:
        output: CSV path; null = predictions.csv in the log dir (next to the evaluated checkpoint).
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def _path(self, trainer: L.Trainer) -> Path:
        default = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        path = Path(self.output) if self.output else default
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any] | None) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        path = self._path(trainer)
        with atomic_write(path, "w", newline="") as f:
            writer = csv.writer(f)
            has_target = bool(batches) and "target" in batches[0]
            writer.writerow(["index", "pred", "prob"] + (["target"] if has_target else []))
            index = 0
            for out in batches:
                pred = out["pred"].tolist()
                prob = out["probs"].gather(-1, out["pred"][:, None])[:, 0].tolist()
                target = out["target"].tolist() if has_target else None
                for i in range(len(pred)):
                    writer.writerow([index, pred[i], f"{prob[i]:.6f}"] + ([target[i]] if has_target else []))
                    index += 1
        print(f"vmoe predict: wrote {index} predictions to {path}")
