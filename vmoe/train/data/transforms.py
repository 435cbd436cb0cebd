"""Per-dataset normalisation statistics and the torchvision-v2 transform pipelines the DataModules share.

Images enter these pipelines either as uint8/float tensors [C, H, W] (in-memory datasets) or as PIL images
(ImageFolder); they leave as float32 [C, H, W], normalised with the dataset's mean and std.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["DATASET_STATS", "stats_for", "parse_rand_augment", "tensor_train_transform", "tensor_eval_transform",
           "imagefolder_train_transform", "imagefolder_eval_transform"]

# (mean, std) per channel of the training split, pixel values scaled to [0, 1].
# digits: measured on all 1,797 images of sklearn's load_digits (pixel / 16).
# fashion_mnist, cifar10, cifar100: the usual values measured on their training sets.
# imagenet: timm's IMAGENET_DEFAULT_MEAN/STD, the default for ImageFolder trees.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def stats_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if name not in DATASET_STATS:
        raise ValueError(f"no normalisation statistics for dataset {name!r}; known: {sorted(DATASET_STATS)}")
    return DATASET_STATS[name]


def _to_float() -> v2.Transform:
    # scale=True maps uint8 [0, 255] to [0, 1] and leaves float inputs as they are.
    return v2.ToDtype(torch.float32, scale=True)


def parse_rand_augment(spec: str) -> tuple[int, int]:
    """(num_ops, magnitude) of a timm-style RandAugment string "rand-m9-n2" (defaults n=2, m=9; magnitude
    on timm's 0-10 scale). Other timm options (mstd, inc, ...) need PIL images: use TimmDataModule for them."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"auto_augment={spec!r}: in-memory datasets support RandAugment strings 'rand-m<M>-n<N>' "
                         "(e.g. rand-m9-n2); for timm's other policies use TimmDataModule")
    values = {"m": 9, "n": 2}
    for part in parts[1:]:
        key, num = part[:1], part[1:]
        if key not in values or not num.isdigit():
            raise ValueError(f"auto_augment={spec!r}: option {part!r} is not supported here (only m<magnitude 0-10> "
                             "and n<number of ops>)")
        values[key] = int(num)
    if not 0 <= values["m"] <= 10 or values["n"] < 1:
        raise ValueError(f"auto_augment={spec!r}: magnitude must be in [0, 10] and n >= 1")
    return values["n"], values["m"]


def tensor_train_transform(img_size: int, mean: Sequence[float], std: Sequence[float], *, augment: str = "crop_flip",
                           padding: int | None = None, auto_augment: str | None = None,
                           re_prob: float = 0.0) -> v2.Transform:
    """Training pipeline for in-memory tensor images [C, H, W] that already have side ``img_size``.

    augment: "none"; "crop_flip" (pad-and-random-crop + horizontal flip: CIFAR, Fashion-MNIST);
    "crop" (pad-and-random-crop only); "affine" (small rotation/shift/scale: digits, where flips change the class).
    auto_augment: "rand-m<M>-n<N>": RandAugment (torchvision's ops, timm's magnitude scale 0-10) on the
    uint8 image, before the geometric augmentation. re_prob: random erasing (per-pixel normal noise, as timm's
    "pixel" mode) of one rectangle after normalisation, with this probability.
    """
    if not 0 <= re_prob <= 1:
        raise ValueError(f"re_prob must be a probability in [0, 1], got {re_prob}")
    pad = max(1, img_size // 8) if padding is None else padding
    steps: list[v2.Transform] = []
    if auto_augment:
        num_ops, magnitude = parse_rand_augment(auto_augment)
        # RandAugment's colour ops (posterize, equalize) need uint8 images
        steps += [v2.ToDtype(torch.uint8, scale=True), v2.RandAugment(num_ops, magnitude, num_magnitude_bins=11)]
    steps.append(_to_float())
    if augment == "crop_flip":
        steps += [v2.RandomCrop(img_size, padding=pad), v2.RandomHorizontalFlip()]
    elif augment == "crop":
        steps += [v2.RandomCrop(img_size, padding=pad)]
    elif augment == "affine":
        steps += [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))]
    elif augment != "none":
        raise ValueError(f"augment must be one of 'none', 'crop', 'crop_flip', 'affine'; got {augment!r}")
    steps.append(v2.Normalize(list(mean), list(std)))
    if re_prob > 0:
        steps.append(v2.RandomErasing(re_prob, value="random"))
    return v2.Compose(steps)


def tensor_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Transform:
    return v2.Compose([_to_float(), v2.Normalize(list(mean), list(std))])


def imagefolder_train_transform(img_size: int, mean: Sequence[float], std: Sequence[float], *,
                                scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                                randaugment: bool = False) -> v2.Transform:
    """Inception-style crop + flip (the ViT / V-MoE recipe) for PIL images, optionally RandAugment."""
    steps: list[v2.Transform] = [v2.PILToTensor(), v2.RandomResizedCrop(img_size, scale=tuple(scale), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaugment:
        steps.append(v2.RandAugment())
    steps += [_to_float(), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def imagefolder_eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], *,
                               crop_pct: float = 0.875) -> v2.Transform:
    """Resize the short side to img_size / crop_pct, then centre-crop img_size (timm's eval convention)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = int(round(img_size / crop_pct))
    return v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(img_size),
                       _to_float(), v2.Normalize(list(mean), list(std))])
