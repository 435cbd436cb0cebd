"""class_names: a DataModule's own names, else its dataset's ``classes`` list; never a count, never a guess."""
import types

from torchvision.datasets import FashionMNIST

from vmoe.train.data import DigitsDataModule, FashionMNISTDataModule, class_names


def test_fashion_mnist_names_without_reading_data(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))  # nothing read yet
    assert class_names(dm) == list(FashionMNIST.classes)


def test_names_from_the_dataset_and_none_when_unknown():
    assert class_names(DigitsDataModule()) is None
    dm = types.SimpleNamespace(val_set=types.SimpleNamespace(classes=["cat", "dog"]))
    assert class_names(dm) == ["cat", "dog"]
    counted = types.SimpleNamespace(classes=10, val_set=types.SimpleNamespace(classes=10))  # CIFAR: a count
    assert class_names(counted) is None
