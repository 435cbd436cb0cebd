"""DigitsDataModule, the seeded split and the shared normalisation."""
import pytest
import torch

from vmoe.train.data import DATASET_STATS, DigitsDataModule, seeded_split, stats_for


def test_seeded_split_is_fixed_disjoint_and_sized():
    a = seeded_split(10, [6, 2, 2], seed=3)
    b = seeded_split(10, [6, 2, 2], seed=3)
    assert [len(s) for s in a] == [6, 2, 2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    assert not all(torch.equal(x, y) for x, y in zip(a, seeded_split(10, [6, 2, 2], seed=4)))
    with pytest.raises(ValueError, match="sum to at most 10"):
        seeded_split(10, [8, 3], seed=0)


def test_digits_split_shapes_and_normalisation():
    dm = DigitsDataModule(img_size=16, augment="none", batch_size=32)
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 1, 16)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [1257, 270, 270]  # 1,797 images, 15 % val, 15 % test
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    # The stored statistics are those of the whole 8x8 set; bilinear upscaling keeps the mean, smooths the std.
    everything = torch.cat([dm.eval_transform(ds.images) for ds in (dm.train_set, dm.val_set, dm.test_set)])
    assert abs(everything.mean().item()) < 0.01 and 0.8 < everything.std().item() < 1.0
    # Same split in a second instance: the split never depends on the global RNG.
    torch.manual_seed(123)
    dm2 = DigitsDataModule(img_size=16)
    dm2.setup()
    assert torch.equal(dm.test_set.labels, dm2.test_set.labels)
    assert torch.equal(dm.test_set.images, dm2.test_set.images)


def test_digits_native_size_keeps_the_pixels():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(img_size=8, augment="none")
    dm.setup()
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    first = dm.train_set.images[0, 0]
    assert any(torch.allclose(first, img) for img in raw)
    everything = torch.cat([dm.eval_transform(ds.images) for ds in (dm.train_set, dm.val_set, dm.test_set)])
    assert abs(everything.mean().item()) < 1e-3 and abs(everything.std().item() - 1) < 1e-3


def test_digits_augmentation_changes_train_images_only():
    dm = DigitsDataModule(img_size=16, augment="affine")
    dm.setup()
    torch.manual_seed(0)
    a = torch.stack([dm.train_set[0][0] for _ in range(4)])
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 4))
    assert torch.equal(dm.test_set[0][0], dm.test_set[0][0])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="img_size"):
        DigitsDataModule(img_size=4)
    with pytest.raises(ValueError, match="augment"):
        DigitsDataModule(augment="mixup")
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="known"):
        stats_for("mnist-3d")
    assert set(DATASET_STATS) >= {"digits", "fashion_mnist", "cifar10", "cifar100", "imagenet"}
