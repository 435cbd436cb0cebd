"""ImageFolderDataModule on a few real CIFAR-10 JPEGs (symlinked) or, without them, generated PNGs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vmoe.train.data import ImageFolderDataModule, ImageReadError, load_rgb

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CLASSES = ["airplane", "cat", "ship"]


def _tree(root: Path, split: str, per_class: int, classes=CLASSES) -> Path:
    """root/split/<class>/*: symlinks to CIFAR-10 JPEGs when they are on this machine, else random PNGs."""
    rng = np.random.default_rng(0)
    for cls in classes:
        folder = root / split / cls
        folder.mkdir(parents=True)
        source = CIFAR_JPEG / ("train" if split == "train" else "test") / cls
        files = sorted(source.glob("*.jpg"))[:per_class] if source.is_dir() else []
        for i in range(per_class):
            if len(files) == per_class:
                (folder / files[i].name).symlink_to(files[i])
            else:
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root / split


def test_loads_batches_with_classes_from_train_dir(tmp_path):
    train, val = _tree(tmp_path, "train", 4), _tree(tmp_path, "val", 2)
    dm = ImageFolderDataModule(str(train), str(val), img_size=24, crop_pct=1.0, batch_size=4, num_workers=0)
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (3, 3, 24)
    assert dm.classes == sorted(CLASSES)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
    assert set(y.tolist()) <= {0, 1, 2}
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 24, 24)
    dm.setup("test")  # test_dir defaults to val_dir
    assert len(dm.test_set) == 6
    # Eval transform is deterministic and normalised with the ImageNet statistics by default.
    assert torch.equal(dm.test_set[0][0], dm.test_set[0][0])
    assert dm.mean == (0.485, 0.456, 0.406)
    assert load_rgb(dm.test_set.samples[0][0]).mode == "RGB"


def test_unreadable_image_error_names_the_file(tmp_path):
    train, val = _tree(tmp_path, "train", 2), _tree(tmp_path, "val", 1)
    bad = train / "cat" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    dm = ImageFolderDataModule(str(train), str(val), img_size=16, batch_size=8, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        for _ in dm.train_dataloader():
            pass


def test_mismatched_classes_and_missing_dirs(tmp_path):
    train = _tree(tmp_path, "train", 1)
    val = _tree(tmp_path, "val", 1, classes=["airplane", "cat", "dog"])
    dm = ImageFolderDataModule(str(train), str(val), img_size=16)
    with pytest.raises(ValueError, match=r"missing \['ship'\], extra \['dog'\]"):
        dm.setup("validate")
    with pytest.raises(FileNotFoundError, match="val_dir"):
        ImageFolderDataModule(str(train), str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="crop_pct"):
        ImageFolderDataModule(str(train), str(train), crop_pct=1.5)
