"""FewShotEvaluation: few-shot linear accuracy of the frozen features every n epochs of (pre)training.

    trainer:
      callbacks:
        - class_path: vmoe.eval.callback.FewShotEvaluation
          init_args: {every_n_epochs: 1, shots: [1, 5, 10]}

Logs ``fewshot/{n}shot`` (and ``fewshot/{n}shot_l2``, the chosen strength) after the epoch's validation.
During training the accuracy is measured on the validation split by default, so the test split stays
untouched until ``vmoe fewshot`` / ``vmoe test``. The default protocol is the reference's (``vmoe.eval.protocol``):
the L2 of the grid with the best mean rank of that split's accuracy over the shot seeds. Every rank runs the same
evaluation on the same images (forwards stay collective under expert parallelism) and logs the same values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from .features import few_shot_features, plan_fewshot
from .fewshot import REFERENCE_L2_GRID, check_l2_grid, check_num_classes
from .protocol import check_protocol, check_shots, evaluate, format_fewshot_table, shot_seeds

__all__ = ["FewShotEvaluation"]


class FewShotEvaluation(Callback):
    """Run the few-shot evaluation of ``vmoe.eval.protocol`` on the module's network every ``every_n_epochs``.

    pool / split: datamodule splits the shots are drawn from and the accuracy is measured on.
    l2_selection: "mean_rank" (the reference's; uses the labels of ``split``) or "heldout" (best accuracy on
    ``holdout_per_class`` further pool images per class, default 20). num_seeds: shot draws averaged over,
    seeded from ``seed`` as the reference does (the same images every epoch). max_test: use only the first N
    images of ``split`` (None = all).
    """

    def __init__(self, every_n_epochs: int = 1, shots: Sequence[int] = (1, 5, 10),
                 l2_grid: Sequence[float] = REFERENCE_L2_GRID, l2_selection: str = "mean_rank",
                 holdout_per_class: Optional[int] = None, num_seeds: int = 1, pool: str = "train",
                 split: str = "val", max_test: int | None = None, seed: int = 0, batch_size: int = 256,
                 verbose: bool = True) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.shots = check_shots(shots)
        self.l2_grid = check_l2_grid(l2_grid).tolist()
        self.holdout = check_protocol(l2_selection, holdout_per_class, num_seeds)
        if pool not in ("train", "val") or split not in ("val", "test") or pool == split:
            raise ValueError(f"pool must be 'train' or 'val' and split 'val' or 'test' (different splits), got "
                             f"pool={pool!r}, split={split!r}")
        if max_test is not None and max_test < 1:
            raise ValueError(f"max_test must be >= 1 (or None for the whole split), got {max_test}")
        self.every_n_epochs, self.l2_selection, self.num_seeds = every_n_epochs, l2_selection, num_seeds
        self.pool, self.split, self.max_test, self.seed = pool, split, max_test, seed
        self.batch_size, self.verbose = batch_size, verbose
        self.last_rows: list[dict] | None = None

    def evaluate(self, network, datamodule) -> list[dict]:
        """The few-shot rows for ``network`` on ``datamodule`` (both splits must be set up)."""
        if getattr(datamodule, f"{self.split}_set", None) is None:
            datamodule.setup("test" if self.split == "test" else "validate")
        plan = plan_fewshot(datamodule, pool_split=self.pool, test_split=self.split,
                            per_class=max(self.shots) + self.holdout, seeds=shot_seeds(self.seed, self.num_seeds),
                            max_test=self.max_test)
        task = few_shot_features(network, plan, self.batch_size)
        return evaluate(task, self.shots, self.l2_grid, self.l2_selection, type(datamodule).__name__)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Refuse a one-class dataset before training, not after the first epoch.
        num_classes = getattr(trainer.datamodule, "num_classes", None)
        if stage == "fit" and num_classes is not None:
            check_num_classes(num_classes)

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
