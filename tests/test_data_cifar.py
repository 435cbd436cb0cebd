"""CIFAR DataModules: in-memory conversion and split (torchvision dataset faked), and the missing-data error."""
import pytest
import torch

from vmoe.train.data import CIFAR10DataModule, CIFAR100DataModule


class _FakeCIFAR:
    def __init__(self, root, train, download):
        n = 20 if train else 7
        g = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
        self.targets = [i % 10 for i in range(n)]


def test_cifar_split_and_layout(monkeypatch):
    dm = CIFAR10DataModule(val_size=5, augment="none", batch_size=4)
    monkeypatch.setattr(dm, "_torchvision_class", lambda: _FakeCIFAR)
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 3, 32)
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [15, 5, 7]
    fake = _FakeCIFAR(None, False, False)
    # HWC uint8 -> CHW, then normalised per channel.
    x, y = dm.test_set[2]
    expected = (torch.as_tensor(fake.data[2]).permute(2, 0, 1).float() / 255 - torch.tensor(dm.mean)[:, None, None]) \
        / torch.tensor(dm.std)[:, None, None]
    assert torch.allclose(x, expected, atol=1e-5) and y.item() == 2
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_cifar100_classes_and_missing_data_error(tmp_path):
    dm = CIFAR100DataModule(data_dir=str(tmp_path))
    assert dm.num_classes == 100 and dm.mean != CIFAR10DataModule().mean
    with pytest.raises(FileNotFoundError, match=r"CIFAR100 not found.*download=True"):
        dm.setup()
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(val_size=50000)
