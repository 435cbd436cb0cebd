"""Helpers for the streaming-data tests: tiny WebDataset shards and Hugging Face datasets on disk, and a
callback recording which samples each rank trained on (the label of sample i is i, so labels name samples)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image


def image_bytes(i: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_wds(root: Path, split: str, shard_sizes: list[int], start: int = 0) -> int:
    """WebDataset shards ``<split>-{i:04d}.tar`` of PNG images + .cls labels (sample k has label start+k) and
    timm's ``_info.json`` entry for the split; returns the number of samples."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    names, k = [], start
    for i, size in enumerate(shard_sizes):
        name = f"{split}-{i:04d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(size):
                sink.write({"__key__": f"s{k:06d}", "png": image_bytes(k), "cls": str(k).encode()})
                k += 1
        names.append(name)
    info_path = root / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"name": "tiny", "splits": {}}
    info["splits"][split] = {"name": split, "num_samples": sum(shard_sizes), "filenames": names,
                             "shard_lengths": list(shard_sizes)}
    info_path.write_text(json.dumps(info))
    return sum(shard_sizes)


def write_hf(root: Path, splits: dict[str, int], num_shards: int = 4) -> None:
    """A Hugging Face dataset as parquet files ``<root>/data/<split>-0000i-of-0000n.parquet`` with an
    ``image`` and a ClassLabel ``label`` column (sample k of a split has label k)."""
    import datasets

    num_classes = max(splits.values())
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)])})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        ds = datasets.Dataset.from_dict({"image": [{"bytes": image_bytes(k), "path": None} for k in range(n)],
                                         "label": list(range(n))}, features=features)
        for i in range(num_shards):
            ds.shard(num_shards, i, contiguous=True).to_parquet(
                str(root / "data" / f"{split}-{i:05d}-of-{num_shards:05d}.parquet"))


class RecordTargets(L.Callback):
    """Writes ``targets_rank<r>.jsonl``: one line per training batch, {"epoch", "step", "batch_idx", "targets"}."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step, "batch_idx": batch_idx,
                "targets": batch[1].tolist()}
        with open(self.out_dir / f"targets_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def read_targets(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(out_dir).glob("targets_rank*.jsonl")):
        rank = int(path.stem.removeprefix("targets_rank"))
        rows += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
    return rows
