"""Benchmark the MoE layer: its dispatch strategies, eager and compiled, against the dense equivalent and peers.

One run prints, for a ViT-S/16-sized layer (D=384, H=1536, 32 images x 197 tokens, K=2, capacity factor
1.05) at E = 8, 32 and 64, the forward+backward time and the peak memory of

- ``sorted``: vmoe's MoEMlp, sorted blocks (the CPU eager default),
- ``static``: vmoe's MoEMlp, static-capacity [E, C, D] buffers and batched matmuls (the GPU/compile default),
- ``static+compile``: the same under ``torch.compile`` (``--no-compile`` leaves it out),
- ``dense``: timm's Mlp on the K*B*T tokens the experts would process (the compute-equivalent),
- ``onehot``: the V-MoE paper's formulation, one-hot [G, S, E, C] dispatch/combine tensors and einsums,
- peers, when installed (else the script says "not installed"): ``st-moe`` (st-moe-pytorch) and
  ``lucidrains`` (mixture-of-experts), both given the same expert MLPs (GELU, hidden H), K=2, the same
  capacity (their factor counts tokens, not assignments, so they get K * 1.05 for the same E*C slots as
  ours) and every second choice kept; they route per image, as they are written to.

as ratios to the dense run. Times are the best of interleaved repeats (every case once per round, so a busy
neighbour slows all of them alike; noise only adds). On CPU they are the process's CPU time with one
intra-op thread (``--threads``): on a shared machine wall time measures the neighbours. On GPU they are wall
times after a synchronize. Peak memory is the CUDA allocator's peak on GPU, or the rise of the process's
peak RSS in a fresh subprocess on CPU (first step, gradients included).

On CPU the script also prints the minor page faults of a step. glibc hands blocks over 32 MB back to the
kernel when they are freed, so a step that allocates such blocks afresh (activations of K*B*T tokens, the E
experts' weight gradients that ``zero_grad(set_to_none=True)`` freed) maps them in page by page again, and
that costs CPU time (2.7 us per 4 KiB page on the machine the README figures come from). vmoe's sorted path
keeps its hidden activations per expert block and reuses its weight-gradient memory (vmoe/moe/grad_buffers.py).

``--allocator`` (CPU): ``caching`` reruns with glibc told to keep freed memory (what jemalloc/tcmalloc, advised
by PyTorch's CPU tuning guide, and the CUDA caching allocator do), which removes the page faults of every case;
``thp`` with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's transparent-huge-page allocation: 512x fewer page faults).
Both apply to every case alike.

    python scripts/bench_moe.py [--experts 8 32 64] [--repeats 5] [--device cpu] [--threads 1] [--no-compile]
                                [--no-memory] [--cases sorted static ...] [--allocator glibc|caching|thp]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from vmoe.moe import MoEMlp, Routing

D, H, B, T, K, CF = 384, 1536, 32, 197, 2, 1.05
OURS = ("sorted", "static", "static+compile")
PEERS = {"st-moe": "st_moe_pytorch", "lucidrains": "mixture_of_experts"}
CASES = ("dense", *OURS, "onehot", *PEERS)
ALLOCATOR_ENV = {
    "glibc": {},
    "caching": {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "MALLOC_TOP_PAD_": "1073741824"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
}


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
        capacity = self.moe.capacity(b * t)
        routing: Routing = self.moe.router(groups, self.moe.settings, capacity).routing
        e = self.moe.num_experts
        kept = routing.slot_index >= 0
        slot = routing.slot_index.clamp_min(0)
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


class FirstOutput(nn.Module):
    """Peers return (output, aux losses...); keep the output and add the aux loss as MoEMlp's graph does."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        return out[0] + 0 * out[1]


def build_peer(kind: str, num_experts: int) -> nn.Module:
    if kind == "st-moe":
        from st_moe_pytorch import MoE

        experts = nn.ModuleList([Mlp(D, H) for _ in range(num_experts)])
        return FirstOutput(MoE(D, num_experts=num_experts, gating_top_n=K, threshold_train=0.0,
                               capacity_factor_train=K * CF, experts=experts))
    if kind == "lucidrains":
        from mixture_of_experts import MoE

        return FirstOutput(MoE(D, num_experts=num_experts, hidden_dim=H, activation=nn.GELU,
                               second_policy_train="all", capacity_factor_train=K * CF))
    raise ValueError(f"unknown peer {kind!r}; valid: {sorted(PEERS)}")


def installed(kind: str) -> bool:
    if kind not in PEERS:
        return True
    try:
        __import__(PEERS[kind])
    except ImportError:
        return False
    return True


def build(kind: str, num_experts: int, device: str):
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device=device)
    if kind == "dense":
        return Mlp(D, H).to(device).train(), torch.randn(K * B, T, D, device=device)
    if kind in PEERS:
        return build_peer(kind, num_experts).to(device).train(), x
    dispatch = "sorted" if kind in ("sorted", "onehot") else "static"
    moe = MoEMlp(D, H, num_experts=num_experts, k=K, capacity_factor=CF, dispatch=dispatch).to(device).train()
    if kind == "onehot":
        return OneHotMoE(moe), x
    if kind == "static+compile":
        moe.compile(fullgraph=True)
    if kind not in OURS:
        raise ValueError(f"unknown kind {kind!r}; valid: {CASES}")
    return moe, x


def step(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    module(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def time_all(kinds: list[str], experts: list[int], repeats: int, device: str
             ) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], int]]:
    """Best fwd+bwd seconds per (kind, E) over the repeats (cases interleaved within each repeat), and the
    fewest minor page faults a step of each took (CPU: fresh memory the kernel had to map in)."""
    keys = [("dense", 0)] if "dense" in kinds else []
    keys += [(kind, e) for e in experts for kind in kinds if kind != "dense"]
    cases = {}
    for key in keys:
        cases[key] = build(key[0], key[1], device)
        step(*cases[key])  # warm-up (and compilation)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in cases}
    faults: dict[tuple[str, int], list[int]] = {key: [] for key in cases}
    for _ in range(repeats):
        for key, (module, x) in cases.items():
            clock = time.perf_counter if x.is_cuda else time.process_time
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = clock()
            step(module, x)
            times[key].append(clock() - start)
            faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {key: min(v) for key, v in times.items()}, {key: min(v) for key, v in faults.items()}


def peak_memory(kind: str, num_experts: int, device: str) -> int:
    """Bytes a fwd+bwd step adds at its peak, measured in a fresh process."""
    # Large blocks straight from mmap, so freed memory leaves the RSS and its peak tracks live tensors.
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV["caching"] and k != "THP_MEM_ALLOC_ENABLE"}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
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
    if kind == "static+compile":
        step(module, x)  # compile first; the measured step is then a steady one (gradients re-allocated)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(module, x)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the kernel's peak-RSS mark (VmHWM)
            f.write("5")
        base = _status_kb("VmRSS")
        step(module, x)
        peak = _status_kb("VmHWM") - base
    print(json.dumps({"peak": peak}))


def _table(title: str, kinds: list[str], experts: list[int], value, ratio) -> None:
    print(title)
    print(f"{'E':>3} | " + " ".join(f"{k:>15}" for k in kinds))
    for e in experts:
        print(f"{e:>3} | " + " ".join(f"{value(k, e):>8.0f} ({ratio(k, e):4.2f})" for k in kinds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--no-compile", action="store_true", help="leave out static+compile")
    parser.add_argument("--no-memory", action="store_true", help="leave out the peak-memory table")
    parser.add_argument("--allocator", choices=sorted(ALLOCATOR_ENV), default="glibc",
                        help="CPU memory allocation (see above); peak memory is measured with glibc's default")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    env = ALLOCATOR_ENV[args.allocator]
    if any(os.environ.get(k) != v for k, v in env.items()):
        # glibc and PyTorch read these at start-up only, so the script runs itself again with them set.
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **env})
    torch.set_num_threads(args.threads)
    if args._memory:
        _memory_child(args._memory[0], int(args._memory[1]), args.device)
        return
    kinds = [k for k in args.cases if not (args.no_compile and k == "static+compile")]
    for kind in [k for k in kinds if not installed(k)]:
        print(f"{kind}: not installed (pip install {PEERS[kind].replace('_', '-')}); left out")
        kinds.remove(kind)
    load = os.getloadavg()
    print(f"MoE layer benchmark: D={D} H={H} B={B} T={T} K={K} capacity_factor={CF} device={args.device} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} allocator={args.allocator} torch={torch.__version__} "
          f"load average at start={load[0]:.1f} ({os.cpu_count()} CPUs)")
    times, faults = time_all(kinds, args.experts, args.repeats, args.device)
    dense = times.get(("dense", 0))
    moe_kinds = [k for k in kinds if k != "dense"]
    print(f"load average at end={os.getloadavg()[0]:.1f}")
    if dense is not None:
        print(f"dense Mlp on K*B*T tokens: {dense * 1e3:.0f} ms per fwd+bwd step")
    _table("fwd+bwd ms per step (ratio to dense)", moe_kinds, args.experts,
           lambda k, e: times[(k, e)] * 1e3, lambda k, e: times[(k, e)] / dense if dense else float("nan"))
    if args.device == "cpu":
        print(f"minor page faults per step (fewest over the rounds; dense: {faults[('dense', 0)]})"
              if dense is not None else "minor page faults per step (fewest over the rounds)")
        print(f"{'E':>3} | " + " ".join(f"{k:>15}" for k in moe_kinds))
        for e in args.experts:
            print(f"{e:>3} | " + " ".join(f"{faults[(k, e)]:>15}" for k in moe_kinds))
    peers = [k for k in moe_kinds if k in PEERS]
    ours = [k for k in moe_kinds if k in OURS]
    if peers and ours:
        print("best of ours vs best peer (peer time / our time):")
        for e in args.experts:
            best_ours = min(ours, key=lambda k: times[(k, e)])
            best_peer = min(peers, key=lambda k: times[(k, e)])
            print(f"  E={e:>2}: {best_ours} {times[(best_ours, e)] / times[(best_peer, e)]:.2f}x the time of "
                  f"{best_peer}: {times[(best_peer, e)] / times[(best_ours, e)]:.2f}x faster")
    if args.no_memory or args.allocator != "glibc":
        return
    mem = {(k, e): peak_memory(k, e, args.device) / 2**20 for k in moe_kinds for e in args.experts}
    dense_mem = peak_memory("dense", 0, args.device) / 2**20
    print(f"\npeak memory of one fwd+bwd step, MB (ratio to dense {dense_mem:.0f} MB; includes the E experts' "
          "weight gradients)")
    _table("", moe_kinds, args.experts, lambda k, e: mem[(k, e)], lambda k, e: mem[(k, e)] / dense_mem)


if __name__ == "__main__":
    main()
