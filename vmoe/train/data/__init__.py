"""LightningDataModules for image classification; each exposes num_classes, in_chans, img_size, mean, std
right after construction, so the CLI can link them into the model."""
from .base import ImageDataModule, TensorImageDataset, class_names, seeded_split
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule, find_fashion_mnist, read_idx
from .imagefolder import ImageFolderDataModule
from .images import ImageReadError, load_rgb
from .timm_data import TimmDataModule, resolve_model_data_config
from .transforms import DATASET_STATS, stats_for

__all__ = ["ImageDataModule", "TensorImageDataset", "seeded_split", "class_names", "CIFAR10DataModule", "CIFAR100DataModule",
           "DigitsDataModule", "FashionMNISTDataModule", "find_fashion_mnist", "read_idx", "ImageFolderDataModule",
           "ImageReadError", "load_rgb", "DATASET_STATS", "stats_for", "TimmDataModule",
           "resolve_model_data_config"]
