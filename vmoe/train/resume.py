"""Exact resume: what a checkpoint must carry so that kill-and-resume equals the uninterrupted run.

Lightning restores the weights, optimizer, schedulers and loop counters. Two things are left:

- the random state (router noise, dropout, augmentation in the main process): :class:`ResumeStateCheckpoint`
  stores torch's CPU (and every CUDA device's) generator, numpy's and Python's, of every rank, and puts them
  back just before training continues;
- the order of the training data: :func:`resumable_loader` draws each epoch's order from (seed, epoch) alone
  (:class:`EpochSampler`), and its loader is *stateful* for Lightning (``state_dict`` / ``load_state_dict``),
  so a checkpoint taken mid-epoch resumes with the batches that epoch had not yet given.

Not covered: random numbers drawn inside DataLoader worker processes (``num_workers > 0``); their seeds
follow (seed, epoch), but persistent workers carry their state across epochs.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSampler", "ResumableDataLoader", "resumable_loader", "ResumeStateCheckpoint",
           "capture_random_state", "restore_random_state"]

_SEED_MOD = 2 ** 63


class EpochSampler(Sampler[int]):
    """range(num_samples), shuffled by a generator seeded with (seed + epoch) when ``shuffle``: the order of
    an epoch depends on nothing else. ``skip_once(epoch, n)`` leaves out the first n indices the next time
    ``epoch`` is iterated (resuming mid-epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.seed, self.shuffle = num_samples, int(seed) % _SEED_MOD, shuffle
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_once(self, epoch: int, num: int) -> None:
        self._skip = (int(epoch), int(num))

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed((self.seed + epoch) % _SEED_MOD)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, None
        start = skip[1] if skip is not None and skip[0] == self.epoch else 0
        return iter(self.order(self.epoch)[start:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves and restores with the loop (it has ``state_dict``/``load_state_dict``):
    the state is the epoch and how many batches of it were given. With an :class:`EpochSampler`, restoring it
    skips those batches once; the loader's generator (worker seeds) is re-seeded from (seed, epoch) too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch, self._given = 0, 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: its body (and so the sampler's order) runs at the first batch, after Lightning's set_epoch.
        sampler = self.sampler
        self._epoch = getattr(sampler, "epoch", 0)
        self._given = 0
        if isinstance(sampler, EpochSampler) and self.generator is not None:
            self.generator.manual_seed((sampler.seed + 7919 * (self._epoch + 1)) % _SEED_MOD)
        for batch in super().__iter__():
            self._given += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._given}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state.get("batches"):
            return
        if not isinstance(self.sampler, EpochSampler) or self.batch_size is None:
            rank_zero_warn(f"resuming mid-epoch ({state['batches']} batches of epoch {state['epoch']} done) with a "
                           f"{type(self.sampler).__name__}: the epoch restarts from its first batch")
            return
        self.sampler.skip_once(state["epoch"], state["batches"] * self.batch_size)


def resumable_loader(dataset: Dataset, *, batch_size: int, seed: int, shuffle: bool = True,
                     **kwargs: Any) -> ResumableDataLoader:
    """A training loader whose order is a function of (seed, epoch) and which resumes mid-epoch exactly.
    ``kwargs``: other DataLoader arguments (drop_last, num_workers, ...)."""
    generator = torch.Generator().manual_seed(int(seed) % _SEED_MOD)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle),
                               generator=generator, **kwargs)


def capture_random_state() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), numpy and Python random states, in types that
    ``torch.load(weights_only=True)`` reads (tensors, tuples, ints, floats, strings)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(cached)),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            rank_zero_warn(f"the checkpoint has the CUDA random states of {len(cuda)} devices, this process sees "
                           f"{torch.cuda.device_count()}: CUDA random numbers will differ from the saved run")


def _train_loaders(trainer: L.Trainer) -> list[Any]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]


class ResumeStateCheckpoint(Callback):
    """Save in each checkpoint (key ``vmoe_resume_state``) every rank's random state and the position of
    each stateful training loader; when ``fit`` resumes from one, put both back at the start of training
    (after the sanity check, which must not shift the random state, and before the first batch is drawn).

    The loader positions are also in Lightning's own loop state, but Lightning 2.6 does not load them back
    when the loader was already built to count the steps of the run (``estimated_stepping_batches``, which the
    learning-rate schedule needs), so they are applied here. With another world size, rank r takes the random
    state of rank r modulo the saved world size.
    """

    KEY = "vmoe_resume_state"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = capture_random_state()
        states = [state]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)  # every rank saves: dump_checkpoint is collective
        loaders = [loader.state_dict() if isinstance(loader, ResumableDataLoader) else None
                   for loader in _train_loaders(trainer)] if trainer.state.fn == TrainerFn.FITTING else []
        checkpoint[self.KEY] = {"ranks": states, "train_loaders": loaders}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(self.KEY)
        if saved is None:
            rank_zero_warn("this checkpoint has no random state or data position (written by an older vmoe or "
                           "without ResumeStateCheckpoint): training resumes with other random numbers")
            return
        ranks = saved["ranks"]
        self._pending = {"random": ranks[trainer.global_rank % len(ranks)], "loaders": saved.get("train_loaders", [])}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        for loader, state in zip(_train_loaders(trainer), self._pending["loaders"]):
            if state is not None and isinstance(loader, ResumableDataLoader):
                loader.load_state_dict(state)
        restore_random_state(self._pending["random"])
        self._pending = None
