"""Fashion-MNIST from the data dir, from Debian's dataset-fashion-mnist package, or downloaded."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ImageDataModule, TensorImageDataset, seeded_split
from .transforms import stats_for, tensor_eval_transform, tensor_train_transform

__all__ = ["FashionMNISTDataModule", "read_idx", "find_fashion_mnist", "DEBIAN_FASHION_MNIST_DIR"]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
          "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an unsigned-byte IDX file (plain or .gz) into a uint8 tensor of the shape its header gives.

    Raises ValueError naming the file when the header or the payload size is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    numel = 1
    for s in shape:
        numel *= s
    if len(data) != header + numel:
        raise ValueError(f"{path}: header says shape {shape} ({numel} bytes) but the file holds "
                         f"{len(data) - header} bytes of data")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _complete(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (each plain or .gz), or None when any is missing."""
    found = {}
    for key, name in _FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def find_fashion_mnist(data_dir: str | os.PathLike, extra_dirs: tuple[Path, ...] | None = None
                       ) -> dict[str, Path] | None:
    """Look in data_dir/FashionMNIST/raw (torchvision's layout), data_dir/fashion-mnist, data_dir, then
    ``extra_dirs`` (default: Debian's copy in DEBIAN_FASHION_MNIST_DIR)."""
    root = Path(data_dir)
    if extra_dirs is None:
        extra_dirs = (DEBIAN_FASHION_MNIST_DIR,)
    for folder in (root / "FashionMNIST" / "raw", root / "fashion-mnist", root, *extra_dirs):
        files = _complete(folder)
        if files is not None:
            return files
    return None


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST: 60,000 train (minus ``val_size`` held out with ``split_seed``) and 10,000 test images,
    28x28 grey, 10 classes; optionally resized to ``img_size``.

    Files are looked up in ``data_dir`` and then in /usr/share/datasets/fashion-mnist
    (``apt-get install dataset-fashion-mnist``); with ``download=True`` torchvision fetches them into data_dir.

    Args:
        data_dir: Folder with the IDX files (torchvision's FashionMNIST/raw layout or flat), then Debian's copy.
        img_size: Image side; 28 keeps the original resolution.
        val_size: Training images held out for validation.
        split_seed: Seed of the train/validation split.
        augment: Training augmentation: none, crop (pad and random crop), crop_flip (+ horizontal flip) or affine.
        auto_augment: RandAugment as "rand-m<M>-n<N>" (timm's magnitude 0-10) before augment; null = off.
        re_prob: Probability of random erasing per training image.
        download: Download the files into data_dir when they are found nowhere.
        batch_size: Training images per batch (per device).
        eval_batch_size: Images per batch in validate/test/predict; null = batch_size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: Pin host memory for faster GPU copies; null = when CUDA is available.
    """

    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

    def __init__(self, data_dir: str = "data", img_size: int = 28, val_size: int = 5000, split_seed: int = 0,
                 augment: str = "crop_flip", download: bool = False, auto_augment: str | None = None,
                 re_prob: float = 0.0, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if img_size < 8:
            raise ValueError(f"img_size must be >= 8, got {img_size}")
        if not 0 < val_size < 60000:
            raise ValueError(f"val_size must be in [1, 59999] (images held out of the 60,000 train), got {val_size}")
        self.data_dir, self.download = data_dir, download
        self.img_size, self.in_chans, self.num_classes = img_size, 1, 10
        self.mean, self.std = stats_for("fashion_mnist")
        self.val_size, self.split_seed, self.augment = val_size, split_seed, augment
        self.auto_augment, self.re_prob = auto_augment, re_prob
        self.train_transform = tensor_train_transform(img_size, self.mean, self.std, augment=augment,
                                                      auto_augment=auto_augment, re_prob=re_prob)
        self.eval_transform = tensor_eval_transform(self.mean, self.std)

    def _files(self) -> dict[str, Path]:
        files = find_fashion_mnist(self.data_dir)
        if files is None and self.download:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(self.data_dir, train=train, download=True)
            files = find_fashion_mnist(self.data_dir)
        if files is None:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {Path(self.data_dir).resolve()} (looked in FashionMNIST/raw, "
                f"fashion-mnist/ and the dir itself) nor in {DEBIAN_FASHION_MNIST_DIR}. Get it with "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set download=True "
                "(--data.download true) to let torchvision download it into data_dir.")
        return files

    def prepare_data(self) -> None:
        self._files()  # downloads once, on one process, when allowed

    def _images(self, path: Path) -> Tensor:
        images = read_idx(path)
        if images.dim() != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{path}: expected images [N, 28, 28], got {tuple(images.shape)}")
        images = images.unsqueeze(1)  # [N, 1, 28, 28]
        if self.img_size != 28:
            images = F.interpolate(images.float(), size=(self.img_size, self.img_size), mode="bilinear",
                                   antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        return images

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = self._files()
        train_x, train_y = self._images(files["train_images"]), read_idx(files["train_labels"])
        test_x, test_y = self._images(files["test_images"]), read_idx(files["test_labels"])
        for x, y, key in ((train_x, train_y, "train_labels"), (test_x, test_y, "test_labels")):
            if y.shape != (x.shape[0],):
                raise ValueError(f"{files[key]}: {tuple(y.shape)} labels for {x.shape[0]} images")
        n = train_x.shape[0]
        train_idx, val_idx = seeded_split(n, [n - self.val_size, self.val_size], self.split_seed)
        self.train_set = TensorImageDataset(train_x[train_idx], train_y[train_idx], self.train_transform)
        self.val_set = TensorImageDataset(train_x[val_idx], train_y[val_idx], self.eval_transform)
        self.test_set = TensorImageDataset(test_x, test_y, self.eval_transform)
