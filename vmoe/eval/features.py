"""Frozen pre-logits features of a timm ViT for few-shot evaluation, and the pieces around them: the labels of
a dataset without decoding its images, the seeded nested per-class draws, the splits with evaluation transforms."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .fewshot import check_num_classes, shot_draw
from .protocol import FewShotTask

__all__ = ["dataset_labels", "draw_pool", "split_for_features", "extract_features", "FewShotPlan", "plan_fewshot",
           "few_shot_features"]


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
    ``forward_head(forward_features(x), pre_logits=True)`` in eval mode; the training mode is restored after.
    ``advance(n)`` is called after each batch of n images."""
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
                advance(len(y))
    finally:
        network.train(was_training)
    if not features:
        raise ValueError("no images to take features of: the dataset is empty")
    return torch.cat(features), torch.cat(labels)


def draw_pool(labels: Tensor, num_classes: int, per_class: int, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(images [P], draws [S, L, per_class]): the reference's nested per-class draw (``shot_draw``) of every seed,
    over a whole split's labels [N]; ``images`` are the distinct split indices drawn (sorted: only these go
    through the network) and ``draws`` indexes into them."""
    if not seeds:
        raise ValueError("at least one shot seed is needed")
    full = torch.stack([shot_draw(labels, num_classes, per_class, s) for s in seeds])  # split indices
    images = full.unique()  # sorted
    return images, torch.searchsorted(images, full)


@dataclass(frozen=True)
class FewShotPlan:
    """What a few-shot evaluation reads: the drawn ``images`` [P] of ``pool_set`` with ``draws`` [S, L, Q]
    indexing into them, and the first ``num_test`` images of ``test_set``."""
    pool_set: Dataset
    images: Tensor
    draws: Tensor
    test_set: Dataset
    num_test: int
    num_classes: int
    seeds: tuple[int, ...]

    @property
    def num_images(self) -> int:
        """Images that go through the network."""
        return self.images.numel() + self.num_test


def plan_fewshot(datamodule, *, pool_split: str, test_split: str, per_class: int, seeds: Sequence[int],
                 max_test: int | None = None) -> FewShotPlan:
    """Draw ``per_class`` images of every class of ``pool_split`` per seed of ``seeds`` (NumPy seeds, see
    ``reference_shot_seed``) and take the first ``max_test`` (default all) images of ``test_split``; reads labels
    only. ValueError below 2 classes or when a class has fewer than ``per_class`` images."""
    num_classes = check_num_classes(datamodule.num_classes)
    if max_test is not None and max_test < 1:
        raise ValueError(f"max_test must be >= 1 (or None for the whole split), got {max_test}")
    pool_set = split_for_features(datamodule, pool_split)
    images, draws = draw_pool(dataset_labels(pool_set), num_classes, per_class, seeds)
    test_set = split_for_features(datamodule, test_split)
    num_test = len(test_set) if max_test is None else min(max_test, len(test_set))
    return FewShotPlan(pool_set, images, draws, test_set, num_test, num_classes, tuple(int(s) for s in seeds))


def few_shot_features(network: nn.Module, plan: FewShotPlan, batch_size: int = 256,
                      advance: Callable[[int], None] | None = None) -> FewShotTask:
    """The features of ``plan``'s images under ``network``, as a task for ``vmoe.eval.protocol``."""
    pool_x, pool_y = extract_features(network, plan.pool_set, plan.images, batch_size, advance=advance)
    test_x, test_y = extract_features(network, plan.test_set, range(plan.num_test), batch_size, advance=advance)
    return FewShotTask(pool_x, pool_y, plan.draws, test_x, test_y, plan.num_classes, plan.seeds)
