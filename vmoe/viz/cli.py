"""``vmoe visualize`` and ``vmoe sweep``: routing pictures and the capacity sweep of a trained checkpoint.

Both take a Lightning checkpoint of :class:`vmoe.train.module.ImageClassifier` (the network and its
hyper-parameters come from it) and a datamodule, chosen like in training: ``--config`` a training YAML
(its ``data`` section is used), else the ``config.yaml`` LightningCLI saved next to the checkpoint's
``checkpoints/`` folder; ``--data ...`` options on the command line override either.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Callable, Optional

import torch
from jsonargparse import ArgumentParser
from lightning import LightningDataModule

from ..argv import bracket_lists, flag_value
from ..io import atomic_write
from ..train.data.base import class_names
from ..train.from_checkpoint import data_defaults_from_checkpoint, load_classifier
from .collect import capacity_blocks, collect_routing_stats, moe_blocks, no_capacity_message
from .plots import plot_capacity_sweep
from .report import dropped_patches_note, routing_figures, save_figure
from .sweep import DEFAULT_CAPACITY_FACTORS, MODES, capacity_sweep, check_sweepable, format_sweep_table

__all__ = ["visualize_main", "sweep_main", "visualize", "sweep"]

_LIST_FLAGS = ("--capacity_factors", "--modes")
_VISUALIZE_FACTORS = [0.5, 1.0]  # the dropped-patch pictures when --capacity_factors is not given


def _parser(prog: str, description: str) -> ArgumentParser:
    import vmoe.train.data  # noqa: F401  (so --data accepts the short class names)

    p = ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    p.add_argument("--ckpt_path", type=str, required=True, help="Lightning checkpoint of an ImageClassifier V-MoE")
    p.add_argument("--out", type=str, required=True, help="directory for the PNG files (created)")
    p.add_argument("--config", type=Optional[str], default=None,
                   help="training YAML whose data section picks the dataset (default: the config.yaml "
                        "LightningCLI saved with the checkpoint)")
    p.add_subclass_arguments(LightningDataModule, "data", required=False,
                             help="datamodule, as in the training config (overrides --config)")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--max_batches", type=Optional[int], default=None,
                   help="evaluate at most this many batches (default: the whole split)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _parse(p: ArgumentParser, argv: list[str]):
    argv = bracket_lists(argv, _LIST_FLAGS)
    ckpt, config = flag_value(argv, "--ckpt_path"), flag_value(argv, "--config")
    source = data_defaults_from_checkpoint(p, ckpt, config)
    args = p.parse_args(argv)
    if args.data is None:
        p.error("no datamodule: pass --config TRAINING_YAML or --data CLASS (e.g. --data FashionMNISTDataModule); "
                "no config.yaml was found next to the checkpoint")
    if args.max_batches is not None and args.max_batches < 1:
        p.error(f"--max_batches must be >= 1, got {args.max_batches}")
    return args, source


def _setup(p: ArgumentParser, args, stage: str, check: Callable[[torch.nn.Module], None] | None = None):
    torch.manual_seed(args.seed)
    dm = p.instantiate(args).data
    module = load_classifier(args.ckpt_path, args.device)
    network = module.model
    moe_blocks(network)  # a clear error now when the checkpoint is a dense model
    if check is not None:  # before the data is read
        check(network)
    size = tuple(int(s) for s in network.patch_embed.img_size)
    dm_size = getattr(dm, "img_size", None)
    if dm_size is not None and tuple([dm_size] * 2 if isinstance(dm_size, int) else dm_size) != size:
        raise ValueError(f"the datamodule makes {dm_size}px images but the checkpoint's model takes {size}; "
                         "pick the data options the model was trained with")
    dm.prepare_data()
    dm.setup(stage)
    return dm, network


def _first_images(loader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, have = [], [], 0
    for x, y in loader:
        images.append(x)
        labels.append(y)
        have += x.shape[0]
        if have >= n:
            break
    if have == 0:
        raise ValueError("the validation split is empty")
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def visualize_main(argv: list[str] | None = None) -> None:
    """Entry of ``vmoe visualize`` (returns None, so the console script exits with status 0)."""
    visualize(argv)


def visualize(argv: list[str] | None = None) -> dict[str, str]:
    """``vmoe visualize``: write the routing pictures of a checkpoint into --out; returns {name: path}."""
    p = _parser("vmoe visualize", "Pictures of a trained V-MoE's routing: dropped patches (vanilla vs BPR) "
                                  "per capacity factor, top-1 expert maps, tokens per expert, class x expert.")
    p.add_argument("--num_images", type=int, default=8, help="validation images shown (they form one batch)")
    p.add_argument("--capacity_factors", type=Optional[list[float]], default=None,
                   help="eval capacity factors of the dropped-patch pictures, e.g. 0.25,0.5,1.0 (default: "
                        f"{','.join(map(str, _VISUALIZE_FACTORS))}; none for Soft MoE, which has no capacity)")
    args, source = _parse(p, sys.argv[1:] if argv is None else argv)
    if args.num_images < 1:
        p.error(f"--num_images must be >= 1, got {args.num_images}")
    factors = args.capacity_factors
    if factors is not None and (not factors or any(not f > 0 for f in factors)):
        p.error(f"--capacity_factors must be a non-empty list of numbers > 0, got {factors}")
    dm, network = _setup(p, args, "validate", None if factors is None else _check_factors_apply)
    if factors is None and capacity_blocks(network):
        factors = _VISUALIZE_FACTORS
    note = dropped_patches_note(network)
    if note is not None:
        print(note)
    images, labels = _first_images(dm.val_dataloader(), args.num_images)
    from ..progress import track  # a progress bar on a terminal: the statistics pass reads the whole split

    loader = dm.val_dataloader()
    total = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
    stats = collect_routing_stats(network, track(loader, "routing statistics", total), dm.num_classes, args.max_batches)
    figures = routing_figures(network, images, labels, mean=getattr(dm, "mean", None), std=getattr(dm, "std", None),
                              capacity_factors=factors, stats=stats, class_names=class_names(dm))
    written = {name: save_figure(fig, os.path.join(args.out, f"{name}.png")) for name, fig in figures.items()}
    print(f"data: {type(dm).__name__}" + (f" (from {source})" if source else ""))
    for path in written.values():
        print(f"wrote {path}")
    return written


def _check_factors_apply(network: torch.nn.Module) -> None:
    if not capacity_blocks(network):
        raise ValueError(f"--capacity_factors: {no_capacity_message(network)}; there are no dropped patches to "
                         "picture, leave out --capacity_factors")


def sweep_main(argv: list[str] | None = None) -> None:
    """Entry of ``vmoe sweep`` (returns None: exit status 0)."""
    sweep(argv)


def sweep(argv: list[str] | None = None) -> list[dict]:
    """``vmoe sweep``: accuracy and dropped tokens at many eval capacity factors, vanilla and BPR.

    Prints the table and writes capacity_sweep.{png,csv,json} into --out; returns the rows.
    """
    p = _parser("vmoe sweep", "Evaluate a trained V-MoE at many eval capacity factors, with vanilla routing "
                              "and Batch Priority Routing; print the table and save the plot.")
    p.add_argument("--capacity_factors", type=list[float], default=list(DEFAULT_CAPACITY_FACTORS),
                   help="eval capacity factors, e.g. 0.1,0.25,0.5,1.0,2.0")
    p.add_argument("--modes", type=list[str], default=list(MODES), help=f"routing modes, from {list(MODES)}")
    p.add_argument("--split", type=str, default="test", help="test or val")
    args, source = _parse(p, sys.argv[1:] if argv is None else argv)
    if args.split not in ("test", "val"):
        p.error(f"--split must be 'test' or 'val', got {args.split!r}")
    dm, network = _setup(p, args, "test" if args.split == "test" else "validate", check_sweepable)
    loader = dm.test_dataloader() if args.split == "test" else dm.val_dataloader()
    rows = capacity_sweep(network, loader, args.capacity_factors, args.modes, args.max_batches)
    title = (f"{type(dm).__name__} {args.split} split, {rows[0]['num_images']} images in batches of "
             f"{loader.batch_size} (one routing group per batch)")
    print(title)
    print(format_sweep_table(rows))
    os.makedirs(args.out, exist_ok=True)
    png = save_figure(plot_capacity_sweep(rows, title=f"Capacity sweep: {title}"),
                      os.path.join(args.out, "capacity_sweep.png"))
    _write_rows(rows, os.path.join(args.out, "capacity_sweep"))
    print(f"wrote {png} and capacity_sweep.csv/.json" + (f" (data from {source})" if source else ""))
    return rows


def _write_rows(rows: list[dict], stem: str) -> None:
    for suffix, write in ((".csv", _write_csv), (".json", _write_json)):
        with atomic_write(stem + suffix, "w", newline="") as f:
            write(rows, f)


def _write_csv(rows: list[dict], f) -> None:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _write_json(rows: list[dict], f) -> None:
    json.dump(rows, f, indent=1)
