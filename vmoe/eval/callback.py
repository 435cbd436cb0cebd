"""FewShotEvaluation: few-shot linear accuracy of the frozen features every n epochs of (pre)training.

    trainer:
      callbacks:
        - class_path: vmoe.eval.callback.FewShotEvaluation
          init_args: {every_n_epochs: 1, shots: [1, 5, 10]}

Logs ``fewshot/{n}shot`` (and ``fewshot/{n}shot_l2``, the chosen strength) after the epoch's validation.
During training the accuracy is measured on the validation split by default, so the test split stays
untouched until ``vmoe fewshot`` / ``vmoe test``. Every rank runs the same evaluation on the same images
(forwards stay collective under expert parallelism) and logs the same values.
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from .features import few_shot_features
from .fewshot import DEFAULT_L2_GRID, fewshot_evaluate, format_fewshot_table

__all__ = ["FewShotEvaluation"]


class FewShotEvaluation(Callback):
    """Run the few-shot evaluation of ``vmoe.eval.fewshot`` on the module's network every ``every_n_epochs``.

    pool / split: datamodule splits the shots are drawn from and the accuracy is measured on; per class,
    max(shots) + holdout_per_class pool images are drawn with ``seed`` (the same images every epoch).
    max_test: use only the first N images of ``split`` (None = all).
    """

    def __init__(self, every_n_epochs: int = 1, shots: Sequence[int] = (1, 5, 10), l2_grid: Sequence[float] =
                 DEFAULT_L2_GRID, holdout_per_class: int = 20, pool: str = "train", split: str = "val",
                 max_test: int | None = None, seed: int = 0, batch_size: int = 256, verbose: bool = True) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not shots or any(int(n) < 1 for n in shots):
            raise ValueError(f"shots must be a non-empty list of counts >= 1, got {list(shots)}")
        if not l2_grid or any(not float(v) > 0 for v in l2_grid):
            raise ValueError(f"l2_grid must be a non-empty list of values > 0, got {list(l2_grid)}")
        if pool not in ("train", "val") or split not in ("val", "test") or pool == split:
            raise ValueError(f"pool must be 'train' or 'val' and split 'val' or 'test' (different splits), got "
                             f"pool={pool!r}, split={split!r}")
        if holdout_per_class < 1:
            raise ValueError(f"holdout_per_class must be >= 1, got {holdout_per_class}")
        self.every_n_epochs, self.shots, self.l2_grid = every_n_epochs, [int(n) for n in shots], list(l2_grid)
        self.holdout_per_class, self.pool, self.split = holdout_per_class, pool, split
        self.max_test, self.seed, self.batch_size, self.verbose = max_test, seed, batch_size, verbose
        self.last_rows: list[dict] | None = None

    def evaluate(self, network, datamodule) -> list[dict]:
        """The few-shot rows for ``network`` on ``datamodule`` (both splits must be set up)."""
        if getattr(datamodule, f"{self.split}_set", None) is None:
            datamodule.setup("test" if self.split == "test" else "validate")
        pool_x, pool_y, test_x, test_y = few_shot_features(
            network, datamodule, pool_split=self.pool, test_split=self.split,
            per_class=max(self.shots) + self.holdout_per_class, seed=self.seed, max_test=self.max_test,
            batch_size=self.batch_size)
        return fewshot_evaluate(pool_x, pool_y, test_x, test_y, datamodule.num_classes, self.shots, self.l2_grid,
                                self.seed)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # At the end of validation: listed before a weight-averaging callback in trainer.callbacks, this
        # measures the averaged weights that validation used (that callback swaps them back in its own hook).
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("FewShotEvaluation needs the trainer to run with a datamodule (vmoe fit does)")
        rows = self.evaluate(getattr(pl_module, "model", pl_module), datamodule)
        for row in rows:
            pl_module.log(f"fewshot/{row['shots']}shot", row["accuracy"], on_epoch=True, sync_dist=False)
            pl_module.log(f"fewshot/{row['shots']}shot_l2", row["l2"], on_epoch=True, sync_dist=False)
        self.last_rows = rows
        if self.verbose and trainer.is_global_zero:
            print(f"\nfew-shot at epoch {trainer.current_epoch} ({self.split} split):\n" + format_fewshot_table(rows))
