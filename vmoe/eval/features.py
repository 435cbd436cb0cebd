"""Frozen pre-logits features of a timm ViT for few-shot evaluation, and the pieces around them: the labels of
a dataset without decoding its images, the seeded per-class pool, the splits with evaluation transforms."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["dataset_labels", "select_pool", "split_for_features", "extract_features", "few_shot_features"]


def dataset_labels(dataset: Dataset) -> Tensor:
    """Labels [N] of a map-style dataset: read from its label list when it has one (in-memory tensors,
    torchvision folders, timm readers), else by iterating it (decodes every image)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attr in ("labels", "targets"):
        values = getattr(dataset, attr, None)
        if values is not None and not callable(values):
            return torch.as_tensor(values, dtype=torch.long)
    samples = getattr(getattr(dataset, "reader", None), "samples", None)
    if samples is not None:
        return torch.as_tensor([target for _, target in samples], dtype=torch.long)
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"few-shot evaluation needs a map-style dataset with a length; got {type(dataset).__name__} "
                         "(an iterable dataset such as WebDataset shards cannot be sampled per class)")
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def select_pool(labels: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices of up to ``per_class`` images of every class (all of a smaller class), drawn with ``seed``,
    sorted. Few-shot draws need only this many, so only these images go through the network."""
    generator = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(picked).sort().values


def split_for_features(datamodule, split: str) -> Dataset:
    """The datamodule's ``split`` ("train", "val", "test") with its evaluation transform: the training images
    must not be augmented when their features are taken."""
    dataset = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}.get(split)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if dataset is None:
        raise RuntimeError(f"{type(datamodule).__name__}: the {split} split is not set up")
    if split == "train":
        eval_transform = getattr(datamodule, "eval_transform", None)
        if eval_transform is None or not hasattr(dataset, "transform"):
            raise ValueError(f"{type(datamodule).__name__} has no eval_transform to read its training split without "
                             "augmentation; use --pool val")
        dataset = copy.copy(dataset)  # shallow: the images are shared, only the transform differs
        dataset.transform = eval_transform
    return dataset


@torch.no_grad()
def extract_features(network: nn.Module, dataset: Dataset, indices: Sequence[int] | Tensor | None = None,
                     batch_size: int = 256, device: torch.device | str | None = None,
                     advance: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """(features [N, D] float32 on CPU, labels [N]) of ``dataset`` (or its ``indices``): the network's pre-logits
    ``forward_head(forward_features(x), pre_logits=True)`` in eval mode; the training mode is restored after."""
    if indices is not None:
        dataset = Subset(dataset, [int(i) for i in indices])
    device = device or next(network.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = network.training
    network.eval()
    features, labels = [], []
    try:
        for x, y in loader:
            out = network.forward_head(network.forward_features(x.to(device)), pre_logits=True)
            features.append(out.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
            if advance is not None:
                advance(1)
    finally:
        network.train(was_training)
    if not features:
        raise ValueError("no images to take features of: the dataset is empty")
    return torch.cat(features), torch.cat(labels)


def few_shot_features(network: nn.Module, datamodule, *, pool_split: str, test_split: str, per_class: int,
                      seed: int, max_test: int | None = None, batch_size: int = 256,
                      advance: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pool_x, pool_y, test_x, test_y): features of ``per_class`` seeded images per class of ``pool_split`` and
    of the first ``max_test`` (default all) images of ``test_split``."""
    pool_set = split_for_features(datamodule, pool_split)
    pool_idx = select_pool(dataset_labels(pool_set), per_class, seed)
    test_set = split_for_features(datamodule, test_split)
    test_idx = None if max_test is None else range(min(max_test, len(test_set)))
    pool_x, pool_y = extract_features(network, pool_set, pool_idx, batch_size, advance=advance)
    test_x, test_y = extract_features(network, test_set, test_idx, batch_size, advance=advance)
    return pool_x, pool_y, test_x, test_y
