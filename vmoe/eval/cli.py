"""``vmoe fewshot``: few-shot linear evaluation of a trained checkpoint's frozen features.

    vmoe fewshot --ckpt_path CK [--config TRAINING_YAML | --data ...] --shots 1,5,10,25 [--out fewshot.json]

The dataset is chosen like ``vmoe visualize`` chooses it (--config, else the config.yaml saved with the
checkpoint; --data.* overrides). Shots come from the training split (evaluation transform, no augmentation);
accuracy is measured on the test split. Default protocol: the reference's (L2 grid 2^-10 ... 2^19, the L2 with
the best mean rank of test accuracy over the shot seeds); ``--l2_selection heldout`` chooses it on held-out
training images instead.
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
from .features import few_shot_features, plan_fewshot
from .fewshot import REFERENCE_L2_GRID
from .protocol import SELECTIONS, check_protocol, evaluate, format_fewshot_table, shot_seeds

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
    p.add_argument("--l2_grid", type=list[float], default=list(REFERENCE_L2_GRID),
                   help="ridge strengths tried (default: the reference's 2^-10 ... 2^19)")
    p.add_argument("--l2_selection", type=str, default="mean_rank",
                   help="mean_rank (the reference's: best mean rank of the evaluated split's accuracy over the shot "
                        "seeds; looks at its labels) or heldout (best accuracy on held-out training images)")
    p.add_argument("--holdout_per_class", type=Optional[int], default=None,
                   help="with --l2_selection heldout: training images per class, beyond the largest shot count, "
                        "held out to choose the l2 (default 20)")
    p.add_argument("--num_seeds", type=int, default=1, help="shot draws to average over (each one seeded from "
                   "--seed as the reference does)")
    p.add_argument("--pool", type=str, default="train", help="split the shots are drawn from: train or val")
    p.add_argument("--split", type=str, default="test", help="split the accuracy is measured on: test or val")
    p.add_argument("--max_test", type=Optional[int], default=None, help="use the first N images of the split")
    p.add_argument("--seed", type=int, default=0, help="seeds the shot draws")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda, ...")
    p.add_argument("--out", type=Optional[str], default=None,
                   help="JSON file for the results (default: fewshot.json in the checkpoint's log dir)")
    return p


def _check(p, args) -> int:
    """Refuse bad options through ``p.error`` (exit 2); returns the held-out images per class."""
    if args.data is None:
        p.error("no datamodule: pass --config TRAINING_YAML or --data CLASS; no config.yaml was found next to "
                "the checkpoint")
    if not args.shots or any(n < 1 for n in args.shots):
        p.error(f"--shots must be a non-empty list of counts >= 1, got {args.shots}")
    if not args.l2_grid or any(not (math.isfinite(v) and v > 0) for v in args.l2_grid):
        p.error(f"--l2_grid must be a non-empty list of finite values > 0, got {args.l2_grid}")
    if args.l2_selection not in SELECTIONS:
        p.error(f"--l2_selection must be one of {', '.join(SELECTIONS)}, got {args.l2_selection!r}")
    try:
        holdout = check_protocol(args.l2_selection, args.holdout_per_class, args.num_seeds)
    except ValueError as err:
        p.error(f"--l2_selection {args.l2_selection}: {err}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_test is not None and args.max_test < 1:
        p.error(f"--max_test must be >= 1, got {args.max_test}")
    if args.pool not in ("train", "val") or args.split not in ("test", "val") or args.pool == args.split:
        p.error(f"--pool must be train or val and --split test or val (different splits), got {args.pool!r} and "
                f"{args.split!r}")
    return holdout


def fewshot(argv: list[str] | None = None) -> list[dict]:
    """Run ``vmoe fewshot``; prints one ``N-shot  acc`` line per shot count, writes JSON, returns the rows."""
    from vmoe.train.from_checkpoint import data_defaults_from_checkpoint, load_classifier

    p = _parser()
    argv = bracket_lists(sys.argv[1:] if argv is None else argv, _LIST_FLAGS)
    ckpt, config = flag_value(argv, "--ckpt_path"), flag_value(argv, "--config")
    source = data_defaults_from_checkpoint(p, ckpt, config)
    args = p.parse_args(argv)
    holdout = _check(p, args)
    torch.manual_seed(args.seed)
    dm = p.instantiate(args).data
    dm.prepare_data()
    dm.setup(None)
    name = type(dm).__name__
    try:
        plan = plan_fewshot(dm, pool_split=args.pool, test_split=args.split, per_class=max(args.shots) + holdout,
                            seeds=shot_seeds(args.seed, args.num_seeds), max_test=args.max_test)
    except ValueError as err:
        p.error(f"{name}: {err}")
    network = load_classifier(args.ckpt_path, args.device).model
    with progress("fewshot features", plan.num_images) as advance:
        task = few_shot_features(network, plan, args.batch_size, advance)
    rows = evaluate(task, args.shots, args.l2_grid, args.l2_selection, name)
    chosen = (f"L2 by best mean rank of {args.split} accuracy (the reference's protocol; it looks at the {args.split} "
              "labels)" if args.l2_selection == "mean_rank" else
              f"L2 by accuracy on {holdout} held-out {args.pool} images per class")
    print(f"{name}: shots from the {args.pool} split ({args.num_seeds} seeded draw(s)), accuracy on "
          f"{task.test_x.shape[0]} {args.split} images, {task.pool_x.shape[1]}-d pre-logits features; {chosen}"
          + (f" (data from {source})" if source else ""))
    print(format_fewshot_table(rows))
    out = args.out or default_output(args.ckpt_path)
    with atomic_write(out) as f:
        json.dump({"ckpt_path": args.ckpt_path, "datamodule": name, "pool": args.pool, "split": args.split,
                   "seed": args.seed, "shot_seeds": list(task.seeds), "l2_selection": args.l2_selection,
                   "l2_grid": [float(v) for v in args.l2_grid], "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return rows


def fewshot_main(argv: list[str] | None = None) -> None:
    """Entry of ``vmoe fewshot`` (returns None: exit status 0)."""
    fewshot(argv)
