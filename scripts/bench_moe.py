"""Benchmark the MoE layer against its compute-equivalent dense MLP and the one-hot einsum dispatch.

One run prints, for a ViT-S/16-sized layer (D=384, H=1536, 32 images x 197 tokens, K=2, capacity factor
1.05) at E = 8, 32 and 64, the forward+backward time and the peak memory of

- ``moe``: vmoe.moe.MoEMlp (sort-based dispatch, the fast path),
- ``dense``: timm's Mlp on the K*B*T tokens the experts would process (the compute-equivalent),
- ``onehot``: the reference V-MoE formulation, one-hot [G, S, E, C] dispatch/combine tensors and einsums,

as ratios to the dense run. Times are the best of interleaved repeats (noise on a shared machine only adds). On CPU they are the process's CPU
time with one intra-op thread (``--threads``): on a shared machine, wall time measures the neighbours and
idle OpenMP threads spin on the clock. On GPU they are wall times after a synchronize. Peak memory is the
CUDA allocator's peak on GPU, or the rise of the process's peak RSS in a fresh subprocess on CPU.

``--allocator caching`` reruns the timing with glibc told to keep freed memory instead of returning it to
the kernel (what jemalloc/tcmalloc, recommended for CPU training by PyTorch's tuning guide, do, and what
the CUDA caching allocator does on GPU): on CPU with the default allocator every step page-faults its
fresh buffers in again, and the E experts' weight gradients make that cost grow with E.

    python scripts/bench_moe.py [--experts 8 32 64] [--repeats 7] [--device cpu] [--threads 1]
                                [--allocator glibc|caching]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from vmoe.moe import MoEMlp, Routing

D, H, B, T, K, CF = 384, 1536, 32, 197, 2, 1.05
CACHING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                      "MALLOC_TOP_PAD_": "1073741824"}


class OneHotMoE(nn.Module):
    """The V-MoE paper's formulation: one-hot dispatch/combine tensors [G, S, E, C] and einsums.

    Shares the router and expert weights of ``moe`` so that only the dispatch differs.
    """

    def __init__(self, moe: MoEMlp) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        groups = x.reshape(1, b * t, d)
        routing: Routing = self.moe.router(groups).routing
        capacity = self.moe.router.capacity(b * t)
        e = self.moe.num_experts
        kept = routing.slot_index >= 0
        slot = routing.slot_index.clamp_min(0)
        # [G, S, K, E] x [G, S, K, C] -> [G, S, E, C]
        onehot_e = F.one_hot(routing.expert_index, e).to(x.dtype)
        onehot_c = F.one_hot(slot, capacity).to(x.dtype) * kept.unsqueeze(-1).to(x.dtype)
        dispatch = torch.einsum("gske,gskc->gsec", onehot_e, onehot_c)
        combine = torch.einsum("gske,gskc,gsk->gsec", onehot_e, onehot_c, routing.combine_weights.to(x.dtype))
        xe = torch.einsum("gsd,gsec->egcd", groups, dispatch).reshape(e, -1, d)
        ex = self.moe.experts
        h = ex.act(torch.baddbmm(ex.fc1_bias.unsqueeze(1), xe, ex.fc1_weight.transpose(1, 2)))
        ye = torch.baddbmm(ex.fc2_bias.unsqueeze(1), h, ex.fc2_weight.transpose(1, 2))
        y = torch.einsum("egcd,gsec->gsd", ye.reshape(e, 1, capacity, d), combine)
        return y.reshape(b, t, d)


def build(kind: str, num_experts: int, device: str):
    torch.manual_seed(0)
    if kind == "dense":
        return Mlp(D, H).to(device).train(), torch.randn(K * B, T, D, device=device)
    moe = MoEMlp(D, H, num_experts=num_experts, k=K, capacity_factor=CF).to(device).train()
    if kind == "moe":
        return moe, torch.randn(B, T, D, device=device)
    if kind == "onehot":
        return OneHotMoE(moe), torch.randn(B, T, D, device=device)
    raise ValueError(f"unknown kind {kind!r}; valid: moe, dense, onehot")


def step(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    module(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def time_all(experts: list[int], repeats: int, device: str) -> dict[tuple[str, int], float]:
    """Best fwd+bwd seconds per (kind, E) over the repeats; kinds are interleaved within each repeat."""
    cases = {("dense", e): build("dense", e, device) for e in experts}
    cases.update({(kind, e): build(kind, e, device) for e in experts for kind in ("moe", "onehot")})
    for module, x in cases.values():  # warm-up
        step(module, x)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in cases}
    for _ in range(repeats):
        for key, (module, x) in cases.items():
            clock = time.perf_counter if x.is_cuda else time.process_time
            start = clock()
            step(module, x)
            times[key].append(clock() - start)
    return {key: min(v) for key, v in times.items()}


def peak_memory(kind: str, num_experts: int, device: str) -> int:
    """Bytes a fwd+bwd step adds at its peak, measured in a fresh process."""
    # Large blocks straight from mmap, so freed memory leaves the RSS and its peak tracks live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--_memory", kind, str(num_experts), "--device", device,
                          "--threads", str(torch.get_num_threads())],
                         check=True, capture_output=True, text=True, env=env)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _memory_child(kind: str, num_experts: int, device: str) -> None:
    module, x = build(kind, num_experts, device)
    # The first step is measured: it allocates the gradients, as the first step of training does.
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(module, x)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # Reset the kernel's peak-RSS mark (VmHWM) so it measures this step alone.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        step(module, x)
        high_water = _status_kb("VmHWM")
        peak = high_water - base
    print(json.dumps({"peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    parser.add_argument("--allocator", choices=["glibc", "caching"], default="glibc",
                        help="CPU only: caching keeps freed memory mapped (see above)")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allocator == "caching" and os.environ.get("MALLOC_TOP_PAD_") is None:
        # glibc reads these at start-up only, so the script runs itself again with them set.
        env = {**os.environ, **CACHING_MALLOC_ENV}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    torch.set_num_threads(args.threads)
    if args._memory:
        _memory_child(args._memory[0], int(args._memory[1]), args.device)
        return
    print(f"MoE layer benchmark: D={D} H={H} B={B} T={T} K={K} capacity_factor={CF} device={args.device} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} allocator={args.allocator}")
    times = time_all(args.experts, args.repeats, args.device)
    print(f"{'E':>3} | {'dense ms':>9} {'moe ms':>9} {'onehot ms':>10} | {'moe/dense':>9} {'onehot/dense':>12} "
          f"{'onehot/moe':>10}")
    for e in args.experts:
        td, tm, to = times[("dense", e)], times[("moe", e)], times[("onehot", e)]
        print(f"{e:>3} | {td * 1e3:>9.1f} {tm * 1e3:>9.1f} {to * 1e3:>10.1f} | {tm / td:>9.2f} {to / td:>12.2f} "
              f"{to / tm:>10.2f}")
    if args.allocator == "caching":
        return  # peak memory is measured with the default allocator (freed memory must leave the RSS)
    print("\npeak memory of one fwd+bwd step (MB; the MoE's includes its E experts' weight gradients)")
    print(f"{'E':>3} | {'dense MB':>8} {'moe MB':>8} {'onehot MB':>9} | {'moe/dense':>9} {'onehot/dense':>12}")
    for e in args.experts:
        md, mm, mo = (peak_memory(kind, e, args.device) / 2**20 for kind in ("dense", "moe", "onehot"))
        print(f"{e:>3} | {md:>8.0f} {mm:>8.0f} {mo:>9.0f} | {mm / md:>9.2f} {mo / md:>12.2f}")


if __name__ == "__main__":
    main()
