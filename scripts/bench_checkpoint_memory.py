"""Peak memory per rank while saving a checkpoint: the gathered one-file path vs the sharded (DCP) path.

A stack of MoE layers (E experts of width D -> H -> D each, AdamW) is fitted one step on W CPU ranks (gloo)
with ExpertParallelDDPStrategy (experts over all W ranks), then ``trainer.save_checkpoint`` runs with
``state_dict_type="full"`` (every rank all-gathers the experts and their two AdamW moments, rank 0 writes one
file) and with ``state_dict_type="sharded"`` (each rank writes its own slices through
torch.distributed.checkpoint). Per rank it reports the resident memory before the save and the peak during it
(Linux VmHWM, reset just before the save through /proc/self/clear_refs), and compares the rise with a budget:
the memory a rank needs for its own shard of weights and moments (``--budget-factor`` times that shard).
``--enforce`` makes the budget a hard limit (RLIMIT_DATA set to the data size before the save plus the
budget): an allocation over it fails, which shows which path fits a rank that cannot hold the full model.

    python scripts/bench_checkpoint_memory.py [--world 2] [--experts 16] [--dim 256] [--hidden 1024]
                                              [--layers 4] [--budget-factor 1.5] [--enforce]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

MiB = 2 ** 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from vmoe.distributed import ExpertParallelDDPStrategy
    from vmoe.moe import MoEMlp

    class MoEStack(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(MoEMlp(args.dim, args.hidden, num_experts=args.experts, k=2, noise_std=0.0)
                                        for _ in range(args.layers))

        def training_step(self, batch, batch_idx):
            h = batch[0]
            for layer in self.layers:
                h = h + layer(h)
            return h.square().mean() + sum(layer.aux_loss for layer in self.layers)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.set_num_threads(1)
    L.seed_everything(0)
    model = MoEStack()
    data = TensorDataset(torch.randn(4 * args.world, 8, args.dim))
    strategy = ExpertParallelDDPStrategy(state_dict_type=args.mode, timeout=timedelta(seconds=300))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=args.world, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=4))
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    shard = 3 * experts + 3 * dense  # this rank's weights + 2 AdamW moments (dense ones are replicated)
    full = 3 * experts * args.world + 3 * dense
    budget = int(args.budget_factor * shard)
    import gc
    gc.collect()
    rss_before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    error = None
    if args.enforce:
        limit = _status("VmData") + budget
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    start = time.perf_counter()
    try:
        trainer.save_checkpoint(Path(args.out) / f"ckpt_{args.mode}")
    except (RuntimeError, MemoryError) as err:
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    if args.enforce:
        resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    result = dict(mode=args.mode, rank=trainer.global_rank, rss_before=rss_before, peak=peak, rise=peak - rss_before,
                  shard_state=shard, full_state=full, budget=budget, seconds=seconds, error=error)
    (Path(args.out) / f"{args.mode}_rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if error is not None:
        os._exit(0)  # the other collectives of this save cannot complete; leave without a teardown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-factor", type=float, default=1.5)
    parser.add_argument("--enforce", action="store_true")
    parser.add_argument("--mode", choices=["full", "sharded"], help=argparse.SUPPRESS)  # internal: one run
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in ("full", "sharded"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--out", out]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
            results = sorted(Path(out).glob(f"{mode}_rank*.json"))
            if not results:
                sys.exit(f"{mode} run failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
            rows += [json.loads(p.read_text()) for p in results]
    first = rows[0]
    print(f"{args.world} ranks, {args.layers} MoE layers x {args.experts} experts ({args.dim} -> {args.hidden}), "
          f"AdamW: full state {first['full_state'] / MiB:.0f} MiB, one rank's shard {first['shard_state'] / MiB:.0f} "
          f"MiB, budget per rank {first['budget'] / MiB:.0f} MiB{' (enforced: RLIMIT_DATA)' if args.enforce else ''}")
    print("| save path | rank | RSS before (MiB) | peak during save (MiB) | rise (MiB) | rise / budget | time (s) | result |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "gathered one file (state_dict_type=full)" if r["mode"] == "full" else "sharded DCP (state_dict_type=sharded)"
        print(f"| {name} | {r['rank']} | {r['rss_before'] / MiB:.0f} | {r['peak'] / MiB:.0f} | {r['rise'] / MiB:.0f} | "
              f"{r['rise'] / r['budget']:.2f} | {r['seconds']:.2f} | {r['error'] or 'saved'} |")
    by_mode = {m: max(r["rise"] for r in rows if r["mode"] == m) for m in ("full", "sharded")}
    print(f"largest rise per rank, gathered / sharded: {by_mode['full'] / max(by_mode['sharded'], 1):.1f}x")


if __name__ == "__main__":
    main()
