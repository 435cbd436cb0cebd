"""Does the input pipeline keep up with the model? Images/s of TimmDataModule's loader beside the step time.

Writes synthetic WebDataset shards (JPEG photos-sized noise, ``--source-size`` px, timm's _info.json) unless
``--root``/``--name`` point at real ones, then measures, in one run:

- the training loader of ``TimmDataModule`` (timm's WebDataset reader, decode, random-resized crop to
  ``--img-size``, flip, colour jitter, normalise; ``--auto-augment`` adds RandAugment) with 0, 1, 2, ... loader
  workers: images/s of the whole loader and per worker (first batch excluded: worker start-up);
- one training step (forward, backward, AdamW) of a V-MoE on a batch of the same shape: images/s the model
  consumes, on ``--device``.

A pipeline with N workers keeps up when its images/s reach the model's. On CPU both share the same cores, so
the figures say how many cores each side needs, not what a GPU machine would see.

    python scripts/bench_data.py [--workers 0 1 2] [--img-size 64] [--source-size 128] [--samples 512]
                                 [--batch-size 32] [--device cpu] [--root DIR --name wds/NAME]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path


def write_shards(root: Path, samples: int, per_shard: int, size: int, classes: int) -> None:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    names, lengths = [], []
    for start in range(0, samples, per_shard):
        name = f"train-{len(names):04d}.tar"
        n = min(per_shard, samples - start)
        with wds.TarWriter(str(root / name)) as sink:
            for k in range(start, start + n):
                # smooth noise compresses like a photo, not like white noise
                small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"s{k:07d}", "jpg": buf.getvalue(), "cls": str(k % classes).encode()})
        names.append(name)
        lengths.append(n)
    split = {"name": "train", "num_samples": samples, "filenames": names, "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps({"name": "synthetic", "splits": {"train": split,
                                                                                 "validation": split}}))


def loader_rate(args: argparse.Namespace, root: str, workers: int) -> tuple[float, int]:
    from vmoe.train.data import TimmDataModule

    dm = TimmDataModule(root, name=args.name, num_classes=args.classes, img_size=args.img_size,
                        batch_size=args.batch_size, num_workers=workers, auto_augment=args.auto_augment,
                        pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, start = 0, None
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for i, (x, _) in enumerate(loader):
            if start is None:  # after the first batch: worker start-up and the first shard open excluded
                start = time.perf_counter()
                continue
            images += x.shape[0]
    return images / (time.perf_counter() - start), images


def model_rate(args: argparse.Namespace) -> tuple[float, float]:
    import torch

    from vmoe.train.module import ImageClassifier

    device = torch.device(args.device)
    model = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=args.classes, img_size=args.img_size,
                            moe_layers="every-2", num_experts=8, k=2, optimizer="adamw", lr=1e-3,
                            model_kwargs=dict(patch_size=args.patch, embed_dim=args.width, depth=args.depth,
                                              num_heads=max(1, args.width // 64), mlp_ratio=4.0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    times = []
    for step in range(args.model_steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y) + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    best = min(times)
    return args.batch_size / best, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=128, help="side of the stored JPEGs")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--auto-augment", default=None)
    parser.add_argument("--root", default=None, help="existing shards (with _info.json); default: synthetic")
    parser.add_argument("--name", default="wds/synthetic")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--model-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = scratch
            write_shards(Path(root), args.samples, args.per_shard, args.source_size, args.classes)
        rows = [(w, *loader_rate(args, root, w)) for w in args.workers]
    model_ips, step = model_rate(args)
    print(f"{args.name}: {args.source_size} px JPEGs -> {args.img_size} px crops, batch {args.batch_size}, "
          f"augment: {args.auto_augment or 'crop+flip+jitter'}; model: V-MoE width {args.width}, depth {args.depth}, "
          f"patch {args.patch}, E=8 every 2nd block, {args.device}, {args.threads} thread(s)")
    print("| loader workers | pipeline images/s | images/s per worker | model images/s (step time) | pipeline / model |")
    print("| --- | --- | --- | --- | --- |")
    for workers, ips, _ in rows:
        print(f"| {workers} | {ips:.0f} | {ips / max(workers, 1):.0f} | {model_ips:.0f} ({step * 1e3:.0f} ms) | "
              f"{ips / model_ips:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
