"""TimmDataModule: timm's create_dataset (folder, tar, the CIFAR-10 JPEG tree read in place) and
create_transform with a model's data config; augmentation options of the in-memory modules."""
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vmoe.eval.features import dataset_labels, split_for_features
from vmoe.train.data import DigitsDataModule, ImageReadError, TimmDataModule, resolve_model_data_config
from vmoe.train.data.transforms import parse_rand_augment

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CLASSES = ["c2", "c10", "c1"]  # natural order: c1, c2, c10


def _tree(root: Path, split: str, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c, cls in enumerate(CLASSES):
        (root / split / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((20, 20, 3), 40 * c, dtype=np.uint8) + rng.integers(0, 20, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root / split


def test_model_data_config_and_overrides():
    augreg = resolve_model_data_config("vit_small_patch16_224.augreg_in21k_ft_in1k", img_size=32)
    assert augreg["mean"] == (0.5, 0.5, 0.5) and augreg["interpolation"] == "bicubic" and augreg["crop_pct"] == 0.9
    assert augreg["input_size"] == (3, 32, 32)
    default = resolve_model_data_config(None)
    assert default["mean"] == pytest.approx((0.485, 0.456, 0.406)) and default["input_size"] == (3, 224, 224)
    grey = resolve_model_data_config(None, in_chans=1, crop_pct=1.0)
    assert grey["mean"] == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,)) and grey["crop_pct"] == 1.0
    with pytest.raises(ValueError, match="not a timm model"):
        resolve_model_data_config("no_such_model")
    with pytest.raises(ValueError, match="3 values for 1 channel"):
        resolve_model_data_config(None, in_chans=1, mean=(0.1, 0.2, 0.3))


def test_folder_splits_classes_transforms_and_labels(tmp_path):
    _tree(tmp_path, "train"), _tree(tmp_path, "validation", 2)
    dm = TimmDataModule(str(tmp_path), model="vit_tiny_patch16_224", img_size=16, auto_augment="rand-m9-mstd0.5-inc1",
                        re_prob=1.0, batch_size=4, num_workers=0)
    assert dm.classes == ["c1", "c2", "c10"] and dm.num_classes == 3 and dm.mean == (0.5, 0.5, 0.5)
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert "RandAugment" in names and "RandomErasing" in names and "RandomResizedCropAndInterpolation" in names
    dm.setup()
    assert len(dm.train_set) == 9 and len(dm.val_set) == len(dm.test_set) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    labels = dataset_labels(dm.val_set)
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    # class index follows the shared map: folder c10 (grey level 40*1) is class 2
    index = labels.tolist().index(2)
    xv, yv = dm.val_set[index]
    assert yv == 2 and xv.mean() == pytest.approx((40 + 9.5) / 255 / 0.5 - 1, abs=0.05)  # eval: no erasing
    # features of the training split are taken without augmentation
    train_eval = split_for_features(dm, "train")
    assert torch.equal(train_eval[0][0], train_eval[0][0]) and dm.train_set.transform is dm.train_transform


def test_tar_file_split(tmp_path):
    _tree(tmp_path / "src", "train"), _tree(tmp_path / "src", "validation", 1)
    for split in ("train", "validation"):
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            tar.add(tmp_path / "src" / split, arcname=".")
    dm = TimmDataModule(str(tmp_path), img_size=16, crop_pct=1.0, batch_size=3, num_workers=0)
    assert dm.classes == ["c1", "c2", "c10"]
    dm.setup("validate")
    assert len(dm.val_set) == 3 and sorted(int(dm.val_set[i][1]) for i in range(3)) == [0, 1, 2]
    assert dm.val_set[0][0].shape == (3, 16, 16)


@pytest.mark.skipif(not (CIFAR_JPEG / "train").is_dir(), reason="the CIFAR-10 JPEG tree is not on this machine")
def test_cifar10_jpeg_tree_in_place_subset():
    dm = TimmDataModule(str(CIFAR_JPEG), val_split="test", model="vit_small_patch16_224", img_size=32, crop_pct=1.0,
                        max_train_samples=64, max_eval_samples=32, batch_size=16, num_workers=0)
    assert dm.num_classes == 10 and dm.classes[0] == "airplane"
    dm.setup()
    assert len(dm.train_set) == 64 and len(dm.test_set) == 32
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 3, 32, 32) and 0 <= int(y.min()) and int(y.max()) < 10


def test_bad_image_and_argument_errors(tmp_path):
    train = _tree(tmp_path, "train")
    _tree(tmp_path, "validation", 1)
    (train / "c1" / "broken.png").write_bytes(b"not a png")
    dm = TimmDataModule(str(tmp_path), img_size=16, batch_size=16, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ImageReadError, match="broken.png"):
        next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="num_classes is needed"):
        TimmDataModule("shards", name="wds/imagenet")
    with pytest.raises(FileNotFoundError, match="test split 'nope'"):
        TimmDataModule(str(tmp_path), test_split="nope").split_path("test")
    with pytest.raises(ValueError, match="crop_pct"):
        TimmDataModule(str(tmp_path), crop_pct=1.5)


def test_in_memory_modules_take_randaugment_and_random_erasing():
    assert parse_rand_augment("rand-m7-n3") == (3, 7) and parse_rand_augment("rand") == (2, 9)
    with pytest.raises(ValueError, match="mstd0.5"):
        parse_rand_augment("rand-m9-mstd0.5")
    dm = DigitsDataModule(img_size=16, augment="none", auto_augment="rand-m9-n2", re_prob=1.0)
    dm.setup()
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert names == ["ToDtype", "RandAugment", "ToDtype", "Normalize", "RandomErasing"]
    x, _ = dm.train_set[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert not torch.equal(x, dm.val_set.transform(dm.train_set.images[0]))  # augmented (erased at p=1)
