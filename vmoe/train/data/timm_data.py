"""timm's data pipeline in a LightningDataModule: ``timm.data.create_dataset`` (image folders, tar files,
WebDataset shards, Hugging Face datasets) and ``timm.data.create_transform`` with a model's resolved data
config (mean/std, interpolation, crop), RandAugment and random erasing. Lightning runs the loaders (workers,
distributed sampler for map-style datasets; timm's iterable readers split shards by rank themselves).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .base import ImageDataModule
from .images import decode_image

__all__ = ["TimmDataModule", "StrictImageDataset", "resolve_model_data_config", "folder_classes"]

_STREAMING = ("wds/", "hfids/", "tfds/")
_SPLIT_SYNONYMS = (("train", "training"), ("validation", "val", "valid", "eval", "evaluation"))  # as timm's folders  # iterable readers: no random access, no per-class sampling


def resolve_model_data_config(model: str | None, *, img_size: int | None = None, in_chans: int = 3,
                              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                              interpolation: str | None = None, crop_pct: float | None = None,
                              crop_mode: str | None = None) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) of ``model``'s
    pretrained_cfg (a timm name, optionally with its tag: ``vit_small_patch16_224.augreg_in21k_ft_in1k``;
    untagged = timm's default weights of that architecture), or timm's ImageNet defaults when None.
    Every explicit argument overrides it; one-channel inputs take the mean of the RGB statistics."""
    import timm.data
    import timm.models

    if model:
        cfg = timm.models.get_pretrained_cfg(model)
        if cfg is None:
            raise ValueError(f"model={model!r} is not a timm model with a pretrained_cfg (e.g. "
                             "vit_small_patch16_224 or vit_small_patch16_224.augreg_in21k_ft_in1k)")
        config = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    else:
        config = timm.data.resolve_data_config({"mean": None})  # timm's defaults: ImageNet statistics
    size = img_size if img_size is not None else config["input_size"][-1]
    config["input_size"] = (in_chans, size, size)
    overrides = dict(mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
    config.update({k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in overrides.items() if v is not None})
    for key in ("mean", "std"):
        if len(config[key]) != in_chans:
            if mean is not None and key == "mean" or std is not None and key == "std":
                raise ValueError(f"{key}={config[key]} has {len(config[key])} values for {in_chans} channel(s)")
            config[key] = tuple([sum(config[key]) / len(config[key])] * in_chans)
    return config


def folder_classes(folder: Path, natural_order: bool = True) -> list[str]:
    """Class names of a <folder>/<class>/<image> tree: its sub-directories, in timm's natural order
    ("c2" before "c10") or, with natural_order=False, plain sorted order (torchvision's ImageFolder)."""
    from timm.utils.misc import natural_key

    names = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not names:
        raise FileNotFoundError(f"{folder} has no class sub-directories; expected <dir>/<class>/<image files>")
    return sorted(names, key=natural_key) if natural_order else sorted(names)


class StrictImageDataset(Dataset):
    """A timm ImageDataset whose undecodable image stops the run with an error naming the file (timm's own
    dataset logs a warning and silently serves the next image instead)."""

    def __init__(self, base: Any) -> None:
        self.reader, self.input_img_mode = base.reader, base.input_img_mode
        self.transform, self.target_transform = base.transform, base.target_transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        img, target, *_ = self.reader[index]
        img = decode_image(img, self.input_img_mode, name=self.reader.filename(index))
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    @property
    def samples(self) -> list:
        """The reader's samples: (path, label) pairs for folders."""
        return self.reader.samples

    @property
    def targets(self) -> list[int]:
        """Labels without decoding images (for per-class sampling)."""
        targets = getattr(self.reader, "targets", None)
        if targets is not None:
            return [int(t) for t in targets]
        return [int(t) for _, t in self.reader.samples]


class TimmDataModule(ImageDataModule):
    """Any dataset ``timm.data.create_dataset`` reads, with timm's transforms.

    Data: ``name`` "" (default) for an image folder or tar file, else a timm reader prefix: "wds/<name>"
    (WebDataset shards with timm's _info.json), "hfds/<hub id>" / "hfids/<hub id>" (Hugging Face datasets),
    "tfds/<name>". ``root``: the folder (or .tar) holding the splits; for folders and tars a split is
    ``root/<split>`` (a directory or ``<split>.tar``; "validation" also finds val/, valid/, eval/, as timm does), or a
    path of its own. ``train_split`` / ``val_split`` /
    ``test_split`` (default: val_split). Classes: ``class_map`` (a dict or timm's .txt file), else the
    sub-directories (or the tar's folders) of the train split in timm's natural order, shared by every split;
    streaming and Hugging Face readers need ``num_classes``.

    Transforms: ``model`` names a timm model (optionally with a pretrained tag) whose pretrained_cfg gives
    mean/std, interpolation, crop_pct and crop_mode (e.g. augreg ViTs: 0.5/0.5, bicubic, 0.9); ``img_size``,
    ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode`` override single values; without ``model``
    timm's ImageNet defaults apply. Training: random-resized crop (``scale``, ``ratio``), flips,
    ``color_jitter``, ``auto_augment`` (timm strings: "rand-m9-mstd0.5-inc1" = RandAugment, "augmix-m5-w4-d2",
    "trivialaugment"), random erasing (``re_prob``, ``re_mode``, ``re_count``); evaluation: resize by crop_pct
    and centre crop. ``max_train_samples`` / ``max_eval_samples``: seeded random subsets (quick runs).
    Streaming readers (wds/, hfids/, tfds/): ``train_num_samples`` / ``eval_num_samples`` = the samples of one
    epoch of a split (timm's ``num_samples``; default the split's size from the shards' _info.json or the
    dataset's metadata); per-epoch coverage and resume: vmoe.train.data.streaming.

    Args:
        root: Folder (or .tar) holding the splits, or the download/cache folder of a reader.
        name: timm reader: "" for a folder or tar, "wds/<name>", "hfds/<hub id>", "hfids/<hub id>", "tfds/<name>".
        train_split: Training split: a name under root or a path of its own.
        val_split: Validation split ("validation" also finds val/, valid/, eval/).
        test_split: Test split; null = val_split.
        num_classes: Number of classes; needed by streaming and Hugging Face readers.
        class_map: Class name -> index, as a dict or timm's .txt file; null = the train split's folders.
        model: timm model (optionally name.tag) whose pretrained_cfg gives mean, std, interpolation, crop.
        img_size: Side of the square crops fed to the model; null = the model's input size.
        in_chans: Image channels (1 = grey).
        mean: Per-channel normalisation mean; null = the model's, else ImageNet's.
        std: Per-channel normalisation std; null = the model's, else ImageNet's.
        interpolation: Resize interpolation: bilinear, bicubic, ...; null = the model's, else bilinear.
        crop_pct: Evaluation crop fraction (resize to img_size / crop_pct, centre crop); null = the model's.
        crop_mode: timm crop mode: center, squash or border; null = the model's.
        scale: Area range of the training random-resized crop.
        ratio: Aspect-ratio range of the training random-resized crop.
        hflip: Probability of a horizontal flip in training.
        vflip: Probability of a vertical flip in training.
        color_jitter: Colour jitter strength in training; null = off.
        auto_augment: timm auto-augment string: "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "trivialaugment".
        re_prob: Probability of random erasing per training image.
        re_mode: Random erasing fill: const, rand or pixel.
        re_count: Random erasing boxes per image.
        max_train_samples: Seeded random subset of the training split; null = all.
        max_eval_samples: Seeded random subset of the evaluation splits; null = all.
        train_num_samples: Streaming readers: samples in one training epoch; null = the split's size.
        eval_num_samples: Streaming readers: samples in one pass over an evaluation split; null = its size.
        subset_seed: Seed of those subsets.
        download: Let the reader download the dataset (Hugging Face, tfds).
        batch_size: Training images per batch (per device).
        eval_batch_size: Images per batch in validate/test/predict; null = batch_size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: Pin host memory for faster GPU copies; null = when CUDA is available.
    """

    def __init__(self, root: str, name: str = "", train_split: str = "train", val_split: str = "validation",
                 test_split: str | None = None, num_classes: int | None = None,
                 class_map: str | dict[str, int] | None = None, model: str | None = None, img_size: int | None = None,
                 in_chans: int = 3, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 interpolation: str | None = None, crop_pct: float | None = None, crop_mode: str | None = None,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, vflip: float = 0.0, color_jitter: float | None = None,
                 auto_augment: str | None = None, re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None, subset_seed: int = 0,
                 train_num_samples: int | None = None, eval_num_samples: int | None = None,
                 download: bool = False, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans}")
        if not 0 <= re_prob <= 1 or not 0 <= hflip <= 1 or not 0 <= vflip <= 1:
            raise ValueError(f"re_prob, hflip and vflip are probabilities in [0, 1]; got {re_prob}, {hflip}, {vflip}")
        for key, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples),
                           ("train_num_samples", train_num_samples), ("eval_num_samples", eval_num_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value}")
        self.name, self.root, self.download = name, root, download
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.streaming = name.lower().startswith(_STREAMING)
        if not self.streaming and (train_num_samples is not None or eval_num_samples is not None):
            raise ValueError(f"train_num_samples / eval_num_samples apply to streaming datasets ({', '.join(_STREAMING)}"
                             f"...), not to name={name!r}; use max_train_samples / max_eval_samples for subsets")
        self.num_samples = {"train": train_num_samples, "val": eval_num_samples, "test": eval_num_samples}
        self.max_train_samples, self.max_eval_samples, self.subset_seed = max_train_samples, max_eval_samples, subset_seed
        self.in_chans, self.model_name = in_chans, model
        self.data_config = resolve_model_data_config(model, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                                                     interpolation=interpolation, crop_pct=crop_pct,
                                                     crop_mode=crop_mode)
        if not 0 < self.data_config["crop_pct"] <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.data_config['crop_pct']}")
        self.img_size = int(self.data_config["input_size"][-1])
        self.mean, self.std = tuple(self.data_config["mean"]), tuple(self.data_config["std"])
        self.interpolation, self.crop_pct = self.data_config["interpolation"], self.data_config["crop_pct"]
        self.crop_mode = self.data_config["crop_mode"]
        self.class_to_idx = self._class_map(class_map)
        self.classes = list(self.class_to_idx) if self.class_to_idx else None
        self.class_names = self.classes
        if num_classes is None and self.class_to_idx is None:
            raise ValueError(f"num_classes is needed for dataset {name!r}: its classes cannot be listed before "
                             "loading (give num_classes, or a class_map)")
        self.num_classes = int(num_classes) if num_classes is not None else len(self.class_to_idx)
        self.train_transform = self._transform(True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip, vflip=vflip,
                                               color_jitter=color_jitter, auto_augment=auto_augment, re_prob=re_prob,
                                               re_mode=re_mode, re_count=re_count)
        self.eval_transform = self._transform(False)

    # --- classes and split locations -------------------------------------------------------------------
    def _local(self) -> bool:
        return "/" not in self.name

    def split_path(self, split: str) -> Path:
        """Where a folder/tar split lives: root/<split>, root/<split>.tar, or the split as a path."""
        value = self.splits[split]
        names = [value] + [n for group in _SPLIT_SYNONYMS if value in group for n in group if n != value]
        candidates = [Path(self.root) / f"{n}{ext}" for n in names for ext in ("", ".tar")] + [Path(value)]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"{split} split {value!r} not found: tried {', '.join(map(str, candidates))} "
                                f"(root={self.root!r})")

    def _sort_natural(self) -> bool:
        return True

    def _class_map(self, class_map: str | dict[str, int] | None) -> dict[str, int] | None:
        if class_map is not None:
            from timm.data.readers.class_map import load_class_map

            return dict(load_class_map(class_map, self.root))
        if not self._local():
            return None
        path = self.split_path("train")
        if path.is_dir():
            return {c: i for i, c in enumerate(folder_classes(path, self._sort_natural()))}
        from timm.data import create_dataset  # a tar: its folders are the classes; timm lists them

        reader = create_dataset("", root=str(path), split="train", search_split=False).reader
        return dict(getattr(reader, "class_name_to_idx", None) or reader.class_to_idx)

    # --- datasets and transforms ------------------------------------------------------------------------
    def _transform(self, training: bool, **augment: Any):
        from timm.data import create_transform

        cfg = self.data_config
        if training and augment.get("color_jitter") is None:
            augment["color_jitter"] = 0.0 if augment.get("auto_augment") else 0.4  # timm's train.py default
        return create_transform(cfg["input_size"], is_training=training, interpolation=cfg["interpolation"],
                                mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
                                **augment)

    def _dataset(self, split: str) -> Dataset:
        from timm.data import create_dataset
        from timm.data.dataset import ImageDataset

        training = split == "train"
        local = self._local()
        extra = {"num_samples": self.num_samples[split]} if self.num_samples[split] is not None else {}
        ds = create_dataset(self.name, root=str(self.split_path(split)) if local else self.root, **extra,
                            split=self.splits[split], search_split=False, class_map=self.class_to_idx,
                            is_training=training, download=self.download, batch_size=self.batch_size,
                            input_img_mode="L" if self.in_chans == 1 else "RGB")
        if isinstance(ds, ImageDataset) and local:
            ds = StrictImageDataset(ds)
        ds.transform = self.train_transform if training else self.eval_transform
        limit = self.max_train_samples if training else self.max_eval_samples
        if limit is not None and not isinstance(ds, IterableDataset) and limit < len(ds):
            import torch

            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.subset_seed))
            ds = _TransformSubset(ds, order[:limit].sort().values.tolist())
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train")
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._dataset("val")
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset("test")

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, IterableDataset):
            # no sampler to make resumable: a stream restarts its epoch on resume (see vmoe.train.data.streaming)
            return self._loader(self.train_set, "train", train=True)
        return super().train_dataloader()

    def _loader(self, dataset: Dataset | None, split: str, *, train: bool) -> DataLoader:
        if not isinstance(dataset, IterableDataset):
            return super()._loader(dataset, split, train=train)
        # timm's iterable readers shuffle (is_training) and split shards over ranks and workers themselves
        from .streaming import StreamLoader

        return StreamLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=self.num_workers > 0, drop_last=train)


class _TransformSubset(Subset):
    """A Subset whose ``transform`` is its dataset's (so a copy can swap it, see vmoe.eval.features)."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        import copy

        self.dataset = copy.copy(self.dataset)
        self.dataset.transform = value

    @property
    def targets(self) -> list[int]:
        return [self.dataset.targets[i] for i in self.indices]
