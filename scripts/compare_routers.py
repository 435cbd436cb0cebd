"""Train every routing scheme on the same tiny ViT, data and budget, then print one comparison table.

    nice -n 5 python scripts/compare_routers.py                       # digits, all schemes
    python scripts/compare_routers.py --schemes '[vmoe, switch]' --max_epochs 5
    python scripts/compare_routers.py --seeds '[0, 1, 2]'             # one table per seed, then the spread

Columns: test accuracy; mean wall time per training step (forward + backward + optimizer, after warm-up);
the weighted auxiliary loss (sum over MoE layers, mean over the last training epoch); load CV (std/mean of
the assignments requested per expert) and the fraction dropped (assignments without a slot; for
expert_choice the tokens no expert took), both averaged over the MoE layers and the test batches.
Each run goes to runs/compare_routers/<scheme>/; the table is also written as table.md and results.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import CLI

from vmoe.io import atomic_write
from vmoe.models import aux_loss
from vmoe.moe import iter_moe_mlps
from vmoe.train.data import DigitsDataModule
from vmoe.train.module import ImageClassifier

# name -> ImageClassifier MoE arguments. Top-2 (or its equivalent) everywhere except switch (top-1, so
# half the expert compute) and dense (every expert); expert_choice's c = 2 matches top-2 compute.
SCHEMES: dict[str, dict[str, Any]] = {
    "vmoe": dict(router="vmoe", k=2),
    "switch": dict(router="switch"),
    "gshard": dict(router="gshard"),
    "shazeer": dict(router="shazeer", k=2),
    "mixtral": dict(router="mixtral", k=2),
    "deepseek": dict(router="deepseek", k=2),
    "deepseek m=2 +1 shared": dict(router="deepseek", k=2,
                                   moe_kwargs={"expert_granularity": 2, "num_shared_experts": 1}),
    "deepseek_v3": dict(router="deepseek_v3", k=2, moe_kwargs={"router_kwargs": {"gamma": 1e-3}}),
    "expert_choice": dict(router="expert_choice", capacity_factor=2.0),
    "soft": dict(router="soft"),
    "dense": dict(router="dense"),
    "switch + residual": dict(router="switch", moe_kwargs={"residual": True}),
}


class RouterStats(L.Callback):
    """Times training steps and collects aux loss (training) and load CV / dropped fraction (test)."""

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.step_times: list[float] = []
        self.epoch_aux: list[float] = []
        self.test_cv: list[float] = []
        self.test_dropped: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_aux = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup_steps:
            self.step_times.append(time.perf_counter() - self._start)
        self.epoch_aux.append(float(aux_loss(pl_module.model).detach()))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        layers = [layer for _, layer in iter_moe_mlps(pl_module.model)]
        self.test_cv.append(sum(float(m.metrics["load_cv"]) for m in layers) / len(layers))
        self.test_dropped.append(sum(float(m.metrics["dropped_fraction"]) for m in layers) / len(layers))


def run_scheme(name: str, moe: dict[str, Any], *, out: Path, max_epochs: int, seed: int, num_experts: int,
               embed_dim: int, depth: int, lr: float) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    data = DigitsDataModule(img_size=16, batch_size=64)
    model = ImageClassifier(
        backbone="vit_tiny_patch16_224", num_classes=data.num_classes, img_size=data.img_size,
        in_chans=data.in_chans, model_kwargs=dict(patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=4,
                                                  mlp_ratio=2.0),
        moe_layers="every-2", num_experts=num_experts, lr=lr, warmup_steps=40, label_smoothing=0.1, **moe)
    stats = RouterStats()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="auto", precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out / name.replace(" ", "_")), callbacks=[stats],
                        gradient_clip_val=1.0)
    trainer.fit(model, datamodule=data)
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    mean = lambda values: sum(values) / max(1, len(values))  # noqa: E731
    return {"test_acc": test["test/acc1"], "ms_per_step": 1000 * mean(stats.step_times),
            "aux_loss": mean(stats.epoch_aux), "load_cv": mean(stats.test_cv),
            "dropped": mean(stats.test_dropped)}


def format_table(results: dict[str, dict[str, float]]) -> str:
    header = "| scheme | test acc | ms/step | aux loss | load CV | dropped |"
    rows = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['test_acc']:.3f} | {r['ms_per_step']:.1f} | {r['aux_loss']:.4f} | "
                    f"{r['load_cv']:.3f} | {r['dropped']:.3f} |")
    return "\n".join(rows)


def format_spread_table(per_seed: dict[int, dict[str, dict[str, float]]]) -> str:
    """One row per scheme over several seeds: test accuracy mean and min-max, the other columns' means."""
    seeds = sorted(per_seed)
    header = (f"| scheme | test acc, mean of seeds {', '.join(map(str, seeds))} | min - max | ms/step | aux loss | "
              "load CV | dropped |")
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    for name in per_seed[seeds[0]]:
        runs = [per_seed[s][name] for s in seeds if name in per_seed[s]]
        acc = [r["test_acc"] for r in runs]
        rows.append(f"| {name} | {mean(acc):.3f} | {min(acc):.3f} - {max(acc):.3f} | "
                    f"{mean([r['ms_per_step'] for r in runs]):.1f} | {mean([r['aux_loss'] for r in runs]):.4f} | "
                    f"{mean([r['load_cv'] for r in runs]):.3f} | {mean([r['dropped'] for r in runs]):.3f} |")
    return "\n".join(rows)


def main(schemes: list[str] | None = None, max_epochs: int = 15, seed: int = 0, num_experts: int = 4,
         embed_dim: int = 64, depth: int = 4, lr: float = 2e-3, out: str = "runs/compare_routers",
         threads: int | None = 1, seeds: list[int] | None = None) -> dict[str, dict[str, float]]:
    """Train each scheme (default: all of SCHEMES) on digits 16x16 with a 4-block ViT of width 64 whose
    blocks 1 and 3 are MoE with ``num_experts`` experts; print and save the table.

    threads: torch CPU threads (1 by default: on a busy shared CPU more threads mostly wait on each other,
    which makes the step times noise); None keeps torch's default. seeds: run the whole comparison once per
    seed (into out/seed<S>/) and print the spread over them (also written as out/spread.md)."""
    if seeds:
        per_seed = {s: main(schemes, max_epochs, s, num_experts, embed_dim, depth, lr, f"{out}/seed{s}", threads)
                    for s in seeds}
        spread = format_spread_table(per_seed)
        print(spread)
        with atomic_write(Path(out) / "spread.md") as f:
            f.write(spread + "\n")
        return {name: per_seed[seeds[0]][name] for name in per_seed[seeds[0]]}
    unknown = sorted(set(schemes or []) - set(SCHEMES))
    if unknown:
        raise ValueError(f"unknown schemes {unknown}; valid: {list(SCHEMES)}")
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in schemes or list(SCHEMES):
        results[name] = run_scheme(name, SCHEMES[name], out=out_dir, max_epochs=max_epochs, seed=seed,
                                   num_experts=num_experts, embed_dim=embed_dim, depth=depth, lr=lr)
        print(f"{name}: {results[name]}", flush=True)
    table = format_table(results)
    print(table)
    for filename, text in (("table.md", table + "\n"), ("results.json", json.dumps(results, indent=2))):
        with atomic_write(out_dir / filename) as f:
            f.write(text)
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
