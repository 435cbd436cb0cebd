"""A DataLoader for timm's streaming readers (``wds/``, ``hfids/``, ``tfds/``) under Lightning.

timm's iterable readers split the shards over every (rank, loader worker) pair themselves and reshuffle them
each epoch from a shared epoch count (``dataset.set_epoch``), which timm's own train.py sets. Lightning calls
``set_epoch`` on a loader's *sampler* only, so :class:`StreamLoader` hands that call on to the dataset, and
tells the reader the number of workers before they start (its ``len`` counts per worker).

What a reader guarantees (timm 1.0, WebDataset): each of the W*N global workers reads the shards whose index
in the epoch's shard order is its id modulo W*N and yields exactly ceil(num_samples / (W*N)) samples, rounded
up to a multiple of the batch size, cycling through its shards again when they hold fewer and stopping
early when they hold more. A sample is seen exactly once per epoch only when the shards divide evenly: equal
shard sizes, a shard count divisible by W*N and per-worker counts that are multiples of the batch size.
Otherwise some samples repeat and others are skipped in that epoch (measured in tests/test_data_streaming.py).

Resuming mid-epoch: a stream has no position to restore (Lightning warns that the loader is not resumable)
and restarts the epoch from its first sample for the batches the epoch had left, so the batches before the
checkpoint are trained on twice and the epoch's last ones not at all; the following epochs are whole.
(Skipping the batches already given would not be exact either: persistent workers carry their sample-shuffle
random state across epochs.)
"""
from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = ["StreamLoader"]


class _EpochToDataset(Sampler):
    """The placeholder sampler of an iterable-dataset loader, plus ``set_epoch`` for the dataset."""

    def __init__(self, sampler: Sampler, dataset: IterableDataset) -> None:
        self.sampler, self.dataset = sampler, dataset

    def __iter__(self) -> Iterator[Any]:
        return iter(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class StreamLoader(DataLoader):
    """DataLoader over an iterable timm dataset: Lightning's per-epoch ``set_epoch`` reaches the dataset."""

    def __init__(self, dataset: IterableDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, IterableDataset):
            raise TypeError(f"StreamLoader takes an IterableDataset (a timm streaming dataset), got "
                            f"{type(dataset).__name__}")
        if hasattr(dataset, "set_loader_cfg"):
            dataset.set_loader_cfg(num_workers=kwargs.get("num_workers", 0))
        super().__init__(dataset, **kwargs)
        if hasattr(dataset, "set_epoch"):
            # DataLoader refuses a new .sampler after __init__; an iterable dataset's sampler only yields
            # placeholders, so the wrapper changes nothing but adding the epoch hook Lightning looks for.
            object.__setattr__(self, "sampler", _EpochToDataset(self.sampler, dataset))
