"""Serving benchmark: images/s of V-MoE-S/16 against ViT-S/16 in eager PyTorch, torch.compile and ONNX Runtime.

One run prints, for batch sizes 1/8/32 (``--batch``) and one intra-op thread and all of them (``--threads``),
the images per second of each runtime for both models, and the ratio of the V-MoE's time per image to the
dense ViT's (same runtime, batch and threads) next to the FLOPs ratio of the two (vmoe.models.flops): a
ratio equal to the FLOPs ratio means the MoE costs what its arithmetic says.

The V-MoE is V-MoE-S/16, E=8 experts in every second block, K=2, eval capacity factor 1.05, routing groups of
one image (group_size = T = 197 tokens), so every runtime has one graph for all batch sizes (a dynamic batch
axis, see vmoe.models.onnx_export). Weights are random (timing only). torch.compile runs with dynamic=True
(one compilation per model) in the static-capacity dispatch; eager runs the CPU default (sorted dispatch).

Times with one thread are the process's CPU time, with all threads wall-clock time; the machine's load average
is printed at the start and the end (on a shared machine neighbours slow every case, wall time most; the best of
``--iters`` repeats is kept, cases interleaved per repeat so neighbours hit all alike).
ONNX Runtime needs the ``onnx`` extra (pip install -e ".[onnx]"); without it that column is left out.

    python scripts/bench_inference.py [--quick] [--batch 1 8 32] [--threads 1 0] [--iters 3]
                                      [--runtimes eager compile ort]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch

from vmoe.models import create_vmoe
from vmoe.models.flops import model_cost

RUNTIMES = ("eager", "compile", "ort")
COMPILED: dict[str, torch.nn.Module] = {}


def build_models(img_size: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = timm.create_model("vit_small_patch16_224", img_size=img_size).eval()
    tokens = dense.patch_embed.num_patches + dense.num_prefix_tokens
    moe = create_vmoe("vit_small_patch16_224", img_size=img_size, moe_layers="every-2", num_experts=8, k=2,
                      eval_capacity_factor=1.05, group_size=tokens).eval()
    return {"ViT-S/16": dense, "V-MoE-S/16": moe}


def ort_session(model: torch.nn.Module, folder: Path, name: str, threads: int):
    import onnxruntime as ort

    from vmoe.models.onnx_export import export_onnx

    path = folder / f"{name.replace('/', '_')}.onnx"
    if not path.exists():
        export_onnx(model, path, dynamic_batch=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    return lambda x: session.run(None, {feed: x.numpy()})[0]


def runners(models: dict[str, torch.nn.Module], runtimes: list[str], folder: Path, threads: int) -> dict:
    out = {}
    for name, model in models.items():
        for runtime in runtimes:
            if runtime == "eager":
                out[(name, runtime)] = model
            elif runtime == "compile":
                if name not in COMPILED:  # one compilation per model, reused for every thread count
                    COMPILED[name] = torch.compile(model, dynamic=True)
                out[(name, runtime)] = COMPILED[name]
            else:
                out[(name, runtime)] = ort_session(model, folder, name, threads)
    return out


def time_cases(cases: dict, batch: int, img_size: int, iters: int, clock) -> dict:
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        for run in cases.values():
            run(x)  # warm-up (compilation, ORT's first-run allocations)
        best = {key: float("inf") for key in cases}
        for _ in range(iters):
            for key, run in cases.items():
                start = clock()
                run(x)
                best[key] = min(best[key], clock() - start)
    return {key: batch / seconds for key, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="intra-op threads; 0 = all CPUs")
    parser.add_argument("--iters", type=int, default=3, help="timed repeats per case (best kept)")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, one timed repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.iters = [b for b in args.batch if b <= 8] or [1], 1
    if args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters}")
    runtimes = list(args.runtimes)
    if "ort" in runtimes:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            print("ort: onnxruntime/onnxscript not installed (pip install -e \".[onnx]\"); left out")
            runtimes.remove("ort")
    warnings.filterwarnings("ignore")
    models = build_models(args.img_size)
    costs = {name: model_cost(model) for name, model in models.items()}
    flops_ratio = costs["V-MoE-S/16"].flops / costs["ViT-S/16"].flops
    load = os.getloadavg()
    print(f"serving benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, img {args.img_size}, iters {args.iters}, "
          f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    print(f"forward GFLOPs per image: ViT-S/16 {costs['ViT-S/16'].gflops:.2f}, V-MoE-S/16 {costs['V-MoE-S/16'].gflops:.2f}"
          f" (FLOPs ratio {flops_ratio:.3f})")
    print("images/s (best of the repeats); ratio = V-MoE time per image / ViT time per image, and that ratio / FLOPs ratio")
    print(f"{'threads':>7} {'batch':>5} {'runtime':>8} | {'ViT-S/16':>9} {'V-MoE-S/16':>10} | {'ratio':>6} {'/FLOPs':>6}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads or os.cpu_count())
            cases = runners(models, runtimes, Path(tmp), threads)
            for batch in args.batch:
                # One thread: the process's CPU time, which a busy neighbour does not inflate the way it does
                # wall time; all threads: wall time (CPU time would add the threads up).
                clock = time.process_time if threads == 1 else time.perf_counter
                rate = time_cases(cases, batch, args.img_size, args.iters, clock)
                for runtime in runtimes:
                    dense, moe = rate[("ViT-S/16", runtime)], rate[("V-MoE-S/16", runtime)]
                    ratio = dense / moe
                    print(f"{threads or os.cpu_count():>7} {batch:>5} {runtime:>8} | {dense:>9.1f} {moe:>10.1f} | "
                          f"{ratio:>6.2f} {ratio / flops_ratio:>6.2f}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
