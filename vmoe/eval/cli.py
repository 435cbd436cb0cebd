"""``vmoe fewshot``: few-shot linear evaluation of a trained checkpoint's frozen features.

    vmoe fewshot --ckpt_path CK [--config TRAINING_YAML | --data ...] --shots 1,5,10,25 [--out fewshot.json]

The dataset is chosen like ``vmoe visualize`` chooses it (--config, else the config.yaml saved with the
checkpoint; --data.* overrides). Shots and the held-out set come from the training split (evaluation
transform, no augmentation); accuracy is measured on the test split.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from ..argv import bracket_lists, flag_value
from ..io import atomic_write
from ..progress import progress
from .features import few_shot_features
from .fewshot import DEFAULT_L2_GRID, fewshot_evaluate, format_fewshot_table

__all__ = ["fewshot_main", "fewshot", "default_output"]

_LIST_FLAGS = ("--shots", "--l2_grid")


def default_output(ckpt_path: str) -> str:
    """<log_dir>/fewshot.json for a checkpoint in <log_dir>/checkpoints/, else next to the checkpoint."""
    folder = Path(ckpt_path).resolve().parent
    return str((folder.parent if folder.name == "checkpoints" else folder) / "fewshot.json")


def _parser():
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    import vmoe.train.data  # noqa: F401  (so --data accepts the short class names)

    p = ArgumentParser(prog="vmoe fewshot", description="Few-shot linear evaluation (closed-form ridge to ±1 "
                                                        "targets) of a checkpoint's frozen pre-logits features.")
    p.add_argument("--ckpt_path", type=str, required=True, help="Lightning checkpoint of an ImageClassifier")
    p.add_argument("--config", type=Optional[str], default=None, help="training YAML whose data section is used")
    p.add_subclass_arguments(LightningDataModule, "data", required=False, help="datamodule (overrides --config)")
    p.add_argument("--shots", type=list[int], default=[1, 5, 10, 25], help="images per class, e.g. 1,5,10,25")
    p.add_argument("--l2_grid", type=list[float], default=list(DEFAULT_L2_GRID), help="ridge strengths tried")
    p.add_argument("--holdout_per_class", type=int, default=20,
                   help="training images per class, beyond the largest shot count, held out to choose the l2")
    p.add_argument("--pool", type=str, default="train", help="split the shots are drawn from: train or val")
    p.add_argument("--split", type=str, default="test", help="split the accuracy is measured on: test or val")
    p.add_argument("--max_test", type=Optional[int], default=None, help="use the first N images of the split")
    p.add_argument("--seed", type=int, default=0, help="seeds the pool and the shot draws")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda, ...")
    p.add_argument("--out", type=Optional[str], default=None,
                   help="JSON file for the results (default: fewshot.json in the checkpoint's log dir)")
    return p


def _check(p, args) -> None:
    if args.data is None:
        p.error("no datamodule: pass --config TRAINING_YAML or --data CLASS; no config.yaml was found next to "
                "the checkpoint")
    if not args.shots or any(n < 1 for n in args.shots):
        p.error(f"--shots must be a non-empty list of counts >= 1, got {args.shots}")
    if not args.l2_grid or any(not v > 0 for v in args.l2_grid):
        p.error(f"--l2_grid must be a non-empty list of values > 0, got {args.l2_grid}")
    if args.holdout_per_class < 1:
        p.error(f"--holdout_per_class must be >= 1, got {args.holdout_per_class}")
    if args.pool not in ("train", "val") or args.split not in ("test", "val") or args.pool == args.split:
        p.error(f"--pool must be train or val and --split test or val (different splits), got {args.pool!r} and "
                f"{args.split!r}")


def fewshot(argv: list[str] | None = None) -> list[dict]:
    """Run ``vmoe fewshot``; prints one ``N-shot  acc`` line per shot count, writes JSON, returns the rows."""
    from vmoe.train.from_checkpoint import data_defaults_from_checkpoint, load_classifier

    p = _parser()
    argv = bracket_lists(sys.argv[1:] if argv is None else argv, _LIST_FLAGS)
    ckpt, config = flag_value(argv, "--ckpt_path"), flag_value(argv, "--config")
    source = data_defaults_from_checkpoint(p, ckpt, config)
    args = p.parse_args(argv)
    _check(p, args)
    torch.manual_seed(args.seed)
    dm = p.instantiate(args).data
    network = load_classifier(args.ckpt_path, args.device).model
    dm.prepare_data()
    dm.setup(None)
    per_class = max(args.shots) + args.holdout_per_class
    n_pool = per_class * dm.num_classes
    n_test = len(getattr(dm, f"{args.split}_set")) if args.max_test is None else args.max_test
    total = math.ceil(n_pool / args.batch_size) + math.ceil(n_test / args.batch_size)
    with progress("fewshot features", total) as advance:
        pool_x, pool_y, test_x, test_y = few_shot_features(
            network, dm, pool_split=args.pool, test_split=args.split, per_class=per_class, seed=args.seed,
            max_test=args.max_test, batch_size=args.batch_size, advance=advance)
    rows = fewshot_evaluate(pool_x, pool_y, test_x, test_y, dm.num_classes, args.shots, args.l2_grid, args.seed)
    print(f"{type(dm).__name__}: shots from the {args.pool} split ({per_class} per class drawn), accuracy on "
          f"{test_x.shape[0]} {args.split} images, {pool_x.shape[1]}-d pre-logits features"
          + (f" (data from {source})" if source else ""))
    print(format_fewshot_table(rows))
    out = args.out or default_output(args.ckpt_path)
    with atomic_write(out) as f:
        json.dump({"ckpt_path": args.ckpt_path, "datamodule": type(dm).__name__, "pool": args.pool,
                   "split": args.split, "seed": args.seed, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return rows


def fewshot_main(argv: list[str] | None = None) -> None:
    """Entry of ``vmoe fewshot`` (returns None: exit status 0)."""
    fewshot(argv)
