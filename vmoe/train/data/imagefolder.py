"""Any ImageNet-layout tree: <dir>/<class>/<image>, with separate train and val (and optional test) dirs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from .base import ImageDataModule
from .transforms import imagefolder_eval_transform, imagefolder_train_transform, stats_for

__all__ = ["ImageFolderDataModule", "ImageReadError", "load_rgb"]


class ImageReadError(OSError):
    """An image file that PIL cannot decode; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image, or raise ImageReadError naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _check_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {str(p)!r} is not a directory; expected <dir>/<class>/<image files>")
    return p


class ImageFolderDataModule(ImageDataModule):
    """Train on ``train_dir``, validate on ``val_dir`` and test on ``test_dir`` (default: ``val_dir``).

    Classes are the sub-directory names of train_dir (sorted); val/test must have the same ones.
    Train: inception-style random-resized crop (``train_crop_scale``) + flip (+ RandAugment); eval: resize the
    short side to img_size / crop_pct then centre crop. mean/std default to ImageNet's.
    """

    def __init__(self, train_dir: str, val_dir: str, test_dir: str | None = None, img_size: int = 224,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 train_crop_scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, randaugment: bool = False,
                 crop_pct: float = 0.875, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        self.train_dir = _check_dir(train_dir, "train_dir")
        self.val_dir = _check_dir(val_dir, "val_dir")
        self.test_dir = _check_dir(test_dir, "test_dir") if test_dir is not None else self.val_dir
        self.classes, _ = find_classes(str(self.train_dir))
        default_mean, default_std = stats_for("imagenet")
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={self.mean} std={self.std}")
        self.img_size, self.in_chans, self.num_classes = img_size, 3, len(self.classes)
        self.train_transform = imagefolder_train_transform(img_size, self.mean, self.std, scale=tuple(train_crop_scale),
                                                           hflip=hflip, randaugment=randaugment)
        self.eval_transform = imagefolder_eval_transform(img_size, self.mean, self.std, crop_pct=crop_pct)

    def _folder(self, root: Path, transform) -> ImageFolder:
        ds = ImageFolder(str(root), transform=transform, loader=load_rgb)
        if ds.classes != self.classes:
            missing = sorted(set(self.classes) - set(ds.classes))
            extra = sorted(set(ds.classes) - set(self.classes))
            raise ValueError(f"{root} has different classes than train_dir {self.train_dir}: missing {missing}, "
                             f"extra {extra}")
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._folder(self.train_dir, self.train_transform)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._folder(self.val_dir, self.eval_transform)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._folder(self.test_dir, self.eval_transform)
