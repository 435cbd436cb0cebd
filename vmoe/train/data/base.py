"""What every vmoe DataModule shares: dataloaders, a seeded split, and an in-memory tensor dataset."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ImageDataModule", "TensorImageDataset", "seeded_split", "class_names"]


class TensorImageDataset(Dataset):
    """Images [N, C, H, W] (uint8 or float in [0, 1]) and labels [N] held in memory; ``transform`` per item."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        return (self.transform(x) if self.transform is not None else x), self.labels[index]


def seeded_split(n: int, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Split range(n) into len(sizes) disjoint index sets by a permutation fixed by ``seed``.

    The split never depends on the global RNG, so every run (and every rank) sees the same split.
    """
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} must be >= 0 and sum to at most {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in sizes:
        out.append(perm[start:start + size].sort().values)
        start += size
    return out


class ImageDataModule(L.LightningDataModule):
    """Base class of the data modules (``--data CLASS``; ``--data.help CLASS`` lists the options of one).

    Subclasses set ``num_classes``, ``in_chans``, ``img_size``, ``mean``, ``std`` in __init__
    (so the CLI can link them into the model before anything is loaded) and build
    ``train_set`` / ``val_set`` / ``test_set`` in ``setup``. predict uses the test split. Subclasses that know
    their classes' names set ``class_names`` (index = label).

    Args:
        batch_size: Training images per batch (per device).
        eval_batch_size: Images per batch in validate/test/predict; null = batch_size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: Pin host memory for faster GPU copies; null = when CUDA is available.
    """

    class_names: Sequence[str] | None = None
    # The evaluation preprocessing, as timm names it (what `vmoe export` records): the in-memory datasets
    # (digits, Fashion-MNIST, CIFAR) resize whole images bilinearly, without a crop; TimmDataModule sets its own.
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.shuffle_seed: int | None = None  # of the training order; None: torch.initial_seed() at first use

    def _loader(self, dataset: Dataset | None, split: str, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: the {split} split is not set up; call setup() first")
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=train and len(dataset) > self.batch_size, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        # The order of each epoch is a function of (shuffle_seed, epoch), and the loader resumes mid-epoch:
        # see vmoe.train.resume. The seed defaults to torch's (seed_everything) and travels in checkpoints.
        if self.train_set is None:
            return self._loader(None, "train", train=True)
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed() % 2 ** 63
        from ..resume import resumable_loader

        return resumable_loader(self.train_set, batch_size=self.batch_size, seed=self.shuffle_seed,
                                drop_last=len(self.train_set) > self.batch_size, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shuffle_seed = state_dict.get("shuffle_seed", self.shuffle_seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)


def class_names(dm: Any) -> list[str] | None:
    """Human names of a datamodule's classes (index = label): its ``class_names``, else the ``classes`` list of
    its val or test dataset (torchvision's datasets have one); None when neither says."""
    names = getattr(dm, "class_names", None)
    for dataset in (getattr(dm, "val_set", None), getattr(dm, "test_set", None)):
        if names is not None:
            break
        names = getattr(dataset, "classes", None)
        names = names if isinstance(names, (list, tuple)) else None  # CIFAR's DataModules: a count, not names
    return [str(n) for n in names] if names is not None else None
