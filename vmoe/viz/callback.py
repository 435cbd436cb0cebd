"""A Lightning callback that logs the routing pictures every N epochs."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from torch import nn

from ..train.data.base import class_names
from .collect import RoutingStats, capacity_blocks, moe_blocks, no_capacity_message
from .report import dropped_patches_note, routing_figures, save_figure

__all__ = ["RoutingPictures"]


def _network(pl_module: LightningModule) -> nn.Module:
    """The timm network inside the LightningModule (``.model`` by the project's convention)."""
    return getattr(pl_module, "model", pl_module)


class RoutingPictures(Callback):
    """Log dropped-patch, expert-map, expert-load and class x expert pictures after validation.

    Every ``every_n_epochs`` epochs (and after the last one), on the global-zero process:
    the first ``num_images`` validation images (the same ones every time, so epochs compare) are routed
    at each of ``capacity_factors`` (None: the model's current eval factor); with ``class_expert`` the
    expert load and class x expert counts are gathered from the routing of every validation batch of
    that epoch (this process's batches only under DDP).
    TensorBoard loggers get ``add_figure``; any other logger (CSVLogger, ...) gets PNG files in
    ``<log_dir>/routing/epoch=<e>/``; without a logger they go to ``<default_root_dir>/routing/``.
    Soft MoE blocks (no capacity, nothing dropped) get no dropped-patch panels (one info line says so at
    setup); ``capacity_factors`` on a model none of whose blocks has a capacity is a ValueError at setup.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8,
                 capacity_factors: Sequence[float] | None = None, class_expert: bool = True) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if capacity_factors is not None and any(not f > 0 for f in capacity_factors):
            raise ValueError(f"capacity_factors must all be > 0, got {list(capacity_factors)}")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.capacity_factors = None if capacity_factors is None else [float(f) for f in capacity_factors]
        self.class_expert = class_expert
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._stats: RoutingStats | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        network = _network(pl_module)
        try:
            capped = capacity_blocks(network)
        except ValueError:  # a dense model: routing_figures names the problem when it runs
            return
        if self.capacity_factors is not None and not capped:
            raise ValueError(f"RoutingPictures(capacity_factors={self.capacity_factors}): "
                             f"{no_capacity_message(network)}; leave capacity_factors out")
        note = dropped_patches_note(network)
        if note is not None:
            rank_zero_info(f"RoutingPictures: {note}")

    def _active(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stats = None

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active(trainer) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return
        images, labels = batch[0], batch[1]
        if self._images is None or self._images.shape[0] < self.num_images:
            have = [] if self._images is None else [self._images]
            self._images = torch.cat(have + [images.detach().cpu()])[: self.num_images]
            have = [] if self._labels is None else [self._labels]
            self._labels = torch.cat(have + [labels.detach().cpu()])[: self.num_images]
        if not self.class_expert:
            return
        # The validation step just ran one forward on this batch: each layer's last routing is its routing.
        network = _network(pl_module)
        num_classes = getattr(network, "num_classes", None)
        routings = {b: layer.last_routing for b, layer in moe_blocks(network).items()}
        if not num_classes or any(r is None or r.expert_index.shape[0] != labels.shape[0] for r in routings.values()):
            return
        if self._stats is None:
            self._stats = RoutingStats(network, num_classes)
        self._stats.add(routings, labels)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(trainer) or self._images is None or not trainer.is_global_zero:
            return
        dm = getattr(trainer, "datamodule", None)
        figures = routing_figures(
            _network(pl_module), self._images, self._labels, mean=getattr(dm, "mean", None),
            std=getattr(dm, "std", None), capacity_factors=self.capacity_factors,
            stats=self._stats, class_names=class_names(dm))
        self._log(trainer, figures)

    def _log(self, trainer: Trainer, figures: dict[str, Figure]) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, fig in figures.items():
                    logger.experiment.add_figure(f"routing/{name}", fig, global_step=step, close=False)
            else:
                root = getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir
                self._save(figures, os.path.join(root, "routing", f"epoch={epoch}"))
        if not trainer.loggers:
            self._save(figures, os.path.join(trainer.default_root_dir, "routing", f"epoch={epoch}"))

    @staticmethod
    def _save(figures: dict[str, Figure], directory: str) -> None:
        for name, fig in figures.items():
            save_figure(fig, os.path.join(directory, f"{name}.png"))
