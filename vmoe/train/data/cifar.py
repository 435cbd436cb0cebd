"""CIFAR-10 / CIFAR-100 through torchvision (python pickles in data_dir, downloaded when allowed)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ImageDataModule, TensorImageDataset, seeded_split
from .transforms import stats_for, tensor_eval_transform, tensor_train_transform

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class _CIFARDataModule(ImageDataModule):
    """Shared CIFAR logic: 50,000 train (minus ``val_size`` held out with ``split_seed``), 10,000 test,
    32x32 RGB held in memory as uint8, optionally resized to ``img_size``.

    Args:
        data_dir: Folder holding (or receiving, with download) torchvision's CIFAR files.
        img_size: Image side; 32 keeps the original resolution.
        val_size: Training images held out for validation.
        split_seed: Seed of the train/validation split.
        augment: Training augmentation: none, crop (pad and random crop), crop_flip (+ horizontal flip) or affine.
        auto_augment: RandAugment as "rand-m<M>-n<N>" (timm's magnitude 0-10) before augment; null = off.
        re_prob: Probability of random erasing per training image.
        download: Download the files into data_dir when missing.
        batch_size: Training images per batch (per device).
        eval_batch_size: Images per batch in validate/test/predict; null = batch_size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: Pin host memory for faster GPU copies; null = when CUDA is available.
    """

    dataset_name: str
    classes: int

    def __init__(self, data_dir: str = "data", img_size: int = 32, val_size: int = 5000, split_seed: int = 0,
                 augment: str = "crop_flip", download: bool = False, auto_augment: str | None = None,
                 re_prob: float = 0.0, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if img_size < 8:
            raise ValueError(f"img_size must be >= 8, got {img_size}")
        if not 0 < val_size < 50000:
            raise ValueError(f"val_size must be in [1, 49999] (images held out of the 50,000 train), got {val_size}")
        self.data_dir, self.download = data_dir, download
        self.img_size, self.in_chans, self.num_classes = img_size, 3, self.classes
        self.mean, self.std = stats_for(self.dataset_name)
        self.val_size, self.split_seed, self.augment = val_size, split_seed, augment
        self.auto_augment, self.re_prob = auto_augment, re_prob
        self.train_transform = tensor_train_transform(img_size, self.mean, self.std, augment=augment,
                                                      auto_augment=auto_augment, re_prob=re_prob)
        self.eval_transform = tensor_eval_transform(self.mean, self.std)

    def _torchvision_class(self) -> type:
        import torchvision.datasets as tvd

        return tvd.CIFAR10 if self.dataset_name == "cifar10" else tvd.CIFAR100

    def _load(self, train: bool, download: bool) -> tuple[Tensor, Tensor]:
        cls = self._torchvision_class()
        try:
            ds = cls(self.data_dir, train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{cls.__name__} not found (or corrupt) in {Path(self.data_dir).resolve()}: {err} Set download=True "
                f"(--data.download true) to fetch it, or train on a JPEG tree with ImageFolderDataModule.") from err
        images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()  # [N, 32, 32, 3] -> [N, 3, 32, 32]
        if self.img_size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(self.img_size, self.img_size), mode="bilinear",
                                   antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        return images, torch.as_tensor(ds.targets)

    def prepare_data(self) -> None:
        if self.download:
            cls = self._torchvision_class()
            for train in (True, False):
                cls(self.data_dir, train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_x, train_y = self._load(True, False)
        test_x, test_y = self._load(False, False)
        n = train_x.shape[0]
        train_idx, val_idx = seeded_split(n, [n - self.val_size, self.val_size], self.split_seed)
        self.train_set = TensorImageDataset(train_x[train_idx], train_y[train_idx], self.train_transform)
        self.val_set = TensorImageDataset(train_x[val_idx], train_y[val_idx], self.eval_transform)
        self.test_set = TensorImageDataset(test_x, test_y, self.eval_transform)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (10 classes); see :class:`_CIFARDataModule` for the arguments."""

    dataset_name, classes = "cifar10", 10


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (100 fine classes); see :class:`_CIFARDataModule` for the arguments."""

    dataset_name, classes = "cifar100", 100
