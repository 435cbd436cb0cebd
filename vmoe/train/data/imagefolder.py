"""Any ImageNet-layout tree: <dir>/<class>/<image>, with separate train and val (and optional test) dirs.

A thin layer over :class:`TimmDataModule` (timm's folder reader and transforms) that keeps the original
arguments: directories per split, torchvision's class order (plain sorted), and a check that every split
has the training classes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from .timm_data import TimmDataModule, folder_classes

__all__ = ["ImageFolderDataModule"]


def _check_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {str(p)!r} is not a directory; expected <dir>/<class>/<image files>")
    return p


class ImageFolderDataModule(TimmDataModule):
    """Train on ``train_dir``, validate on ``val_dir`` and test on ``test_dir`` (default: ``val_dir``).

    Classes are the sub-directory names of train_dir (sorted); val/test must have the same ones.
    Train: inception-style random-resized crop (``train_crop_scale``) + flip, optionally RandAugment
    (``randaugment: true`` = timm's "rand-m9-mstd0.5-inc1", or any timm ``auto_augment`` string) and random
    erasing (``re_prob``); eval: resize the short side to img_size / crop_pct then centre crop.
    Normalisation: ``mean``/``std`` if given, else those of ``model``'s pretrained_cfg (a timm name such as
    vit_small_patch16_224: 0.5/0.5, what timm's augreg ViT weights expect), else ImageNet's.

    Args:
        train_dir: Training images, one sub-directory per class.
        val_dir: Validation images, the same class sub-directories.
        test_dir: Test images; null = val_dir.
        img_size: Side of the square crops fed to the model.
        mean: Per-channel normalisation mean; null = from model's pretrained_cfg, else ImageNet's.
        std: Per-channel normalisation std; null = from model's pretrained_cfg, else ImageNet's.
        train_crop_scale: Area range of the training random-resized crop.
        hflip: Probability of a horizontal flip in training.
        randaugment: Add timm's RandAugment "rand-m9-mstd0.5-inc1" in training.
        crop_pct: Evaluation: resize the short side to img_size / crop_pct, then centre crop.
        model: timm model name whose pretrained_cfg gives mean and std, e.g. vit_small_patch16_224.
        interpolation: Resize interpolation: bilinear, bicubic, nearest, ...
        auto_augment: A timm auto-augment string (e.g. "rand-m9-mstd0.5-inc1"), instead of randaugment.
        re_prob: Probability of random erasing per training image.
        batch_size: Training images per batch (per device).
        eval_batch_size: Images per batch in validate/test/predict; null = batch_size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: Pin host memory for faster GPU copies; null = when CUDA is available.
    """

    def __init__(self, train_dir: str, val_dir: str, test_dir: str | None = None, img_size: int = 224,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 train_crop_scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, randaugment: bool = False,
                 crop_pct: float = 0.875, model: str | None = None, interpolation: str = "bilinear",
                 auto_augment: str | None = None, re_prob: float = 0.0, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 4, pin_memory: bool | None = None) -> None:
        self.train_dir = _check_dir(train_dir, "train_dir")
        self.val_dir = _check_dir(val_dir, "val_dir")
        self.test_dir = _check_dir(test_dir, "test_dir") if test_dir is not None else self.val_dir
        if mean is not None and len(mean) != 3 or std is not None and len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
        if randaugment and auto_augment:
            raise ValueError(f"give randaugment=true or auto_augment={auto_augment!r}, not both")
        super().__init__(root="", train_split=str(self.train_dir), val_split=str(self.val_dir),
                         test_split=str(self.test_dir), model=model, img_size=img_size, mean=mean, std=std,
                         interpolation=interpolation, crop_pct=crop_pct, scale=tuple(train_crop_scale), hflip=hflip,
                         color_jitter=0.0, auto_augment="rand-m9-mstd0.5-inc1" if randaugment else auto_augment,
                         re_prob=re_prob, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, pin_memory=pin_memory)

    def _sort_natural(self) -> bool:
        return False  # torchvision's ImageFolder order, as checkpoints trained before the timm pipeline used

    def _dataset(self, split: str) -> Dataset:
        root = self.split_path(split)
        if split != "train":
            classes = folder_classes(root, natural_order=False)
            if classes != self.classes:
                missing = sorted(set(self.classes) - set(classes))
                extra = sorted(set(classes) - set(self.classes))
                raise ValueError(f"{root} has different classes than train_dir {self.train_dir}: missing {missing}, "
                                 f"extra {extra}")
        return super()._dataset(split)
