"""Callbacks the `vmoe` CLI adds: write `vmoe predict` results to a CSV file."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from ..io import atomic_write

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """After ``vmoe predict``, write one row per image: index, pred, prob (of pred), target (when known).

    output: the CSV path; None = <trainer.log_dir>/predictions.csv. Written atomically (temp file + rename).
    With several processes each writes its own file, suffixed by its global rank.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.last_path: Path | None = None

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
        self.last_path = path
        print(f"vmoe predict: wrote {index} predictions to {path}")
