"""scikit-learn's handwritten digits (1,797 real 8x8 images, shipped in the wheel): the offline default."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ImageDataModule, TensorImageDataset, seeded_split
from .transforms import stats_for, tensor_eval_transform, tensor_train_transform

__all__ = ["DigitsDataModule"]


class DigitsDataModule(ImageDataModule):
    """sklearn ``load_digits`` upscaled from 8x8 to ``img_size`` (bilinear), one grey channel, 10 classes.

    A fixed train/val/test split drawn with ``split_seed`` (defaults: 1,257 / 270 / 270 images).
    augment: see :func:`tensor_train_transform` ("affine" by default: flips would change digits).

    Args:
        img_size: Image side after the bilinear upscale from 8x8 (>= 8).
        val_fraction: Fraction of the 1,797 images held out for validation.
        test_fraction: Fraction of the images held out for testing.
        split_seed: Seed of the fixed train/val/test split.
        augment: Training augmentation: none, crop (pad and random crop), crop_flip (+ horizontal flip) or affine.
        auto_augment: RandAugment as "rand-m<M>-n<N>" (timm's magnitude 0-10) before augment; null = off.
        re_prob: Probability of random erasing per training image.
        batch_size: Training images per batch (per device).
        eval_batch_size: Images per batch in validate/test/predict; null = batch_size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: Pin host memory for faster GPU copies; null = when CUDA is available.
    """

    def __init__(self, img_size: int = 16, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, augment: str = "affine", auto_augment: str | None = None,
                 re_prob: float = 0.0, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if img_size < 8:
            raise ValueError(f"img_size must be >= 8 (the digits are 8x8), got {img_size}")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be > 0 with a sum < 1, got {val_fraction} "
                             f"and {test_fraction}")
        self.img_size, self.in_chans, self.num_classes = img_size, 1, 10
        self.mean, self.std = stats_for("digits")
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.augment, self.auto_augment, self.re_prob = augment, auto_augment, re_prob
        self.train_transform = tensor_train_transform(img_size, self.mean, self.std, augment=augment,
                                                      auto_augment=auto_augment, re_prob=re_prob)
        self.eval_transform = tensor_eval_transform(self.mean, self.std)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
        if self.img_size != 8:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear",
                                   align_corners=False).clamp_(0, 1)
        labels = torch.as_tensor(digits.target)
        n = images.shape[0]
        n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
        train_idx, val_idx, test_idx = seeded_split(n, [n - n_val - n_test, n_val, n_test], self.split_seed)
        self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], self.train_transform)
        self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], self.eval_transform)
        self.test_set = TensorImageDataset(images[test_idx], labels[test_idx], self.eval_transform)
