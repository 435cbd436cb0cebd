"""Fashion-MNIST: IDX reading, where the files are looked up, and the error when they are nowhere."""
import gzip
from pathlib import Path

import pytest
import torch

import vmoe.train.data.fashion_mnist as fm
from vmoe.train.data import FashionMNISTDataModule, read_idx


def _idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(s.to_bytes(4, "big") for s in array.shape)
    return header + bytes(array.flatten().tolist())


def _write(path: Path, array: torch.Tensor, gz: bool) -> None:
    data = _idx_bytes(array)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion(folder: Path, n_train: int = 6, n_test: int = 3, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    _write(folder / "train-images-idx3-ubyte", torch.randint(0, 256, (n_train, 28, 28), generator=g), gz)
    _write(folder / "train-labels-idx1-ubyte", torch.arange(n_train) % 10, gz)
    _write(folder / "t10k-images-idx3-ubyte", torch.randint(0, 256, (n_test, 28, 28), generator=g), gz)
    _write(folder / "t10k-labels-idx1-ubyte", (torch.arange(n_test) + 3) % 10, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    array = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    _write(tmp_path / "x-idx3-ubyte", array, gz)
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    assert torch.equal(read_idx(path), array)


def test_read_idx_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad-idx3-ubyte"):
        read_idx(bad)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(_idx_bytes(torch.arange(5, dtype=torch.uint8))[:-2])
    with pytest.raises(ValueError, match=r"short-idx1-ubyte.*5 bytes"):
        read_idx(short)


def test_data_dir_in_torchvision_layout_comes_first(tmp_path):
    _fake_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=2, augment="none", batch_size=2)
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [4, 2, 3]
    assert dm.test_set.labels.tolist() == [3, 4, 5]
    x, _ = dm.test_set[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    mean, std = dm.mean[0], dm.std[0]
    raw = read_idx(tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte")[0].float() / 255
    assert torch.allclose(x[0], (raw - mean) / std, atol=1e-5)


def test_resize_and_gzip_in_data_dir(tmp_path):
    _fake_fashion(tmp_path, gz=True)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), img_size=14, val_size=1)
    dm.setup()
    assert dm.train_set.images.shape == (5, 1, 14, 14) and dm.train_set.images.dtype == torch.uint8


def test_missing_everywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-copy")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*download=True"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        dm.prepare_data()


@pytest.mark.skipif(not fm.DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_copy_is_found(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=5000)
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [55000, 5000, 10000]
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
    assert dm.train_set.images.shape[1:] == (1, 28, 28)
