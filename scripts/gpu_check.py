"""One GPU check for the day a CUDA machine is at hand; on a machine without CUDA it prints
"skipped: no CUDA" and exits 0.

On CUDA it
1. checks, in bf16 (under autocast, as ``--trainer.precision bf16-mixed`` runs), that the grouped_mm path,
   the static-capacity path and the per-expert reference loop agree (outputs and gradients), and that the
   path taken is the one expected (grouped_mm on SM >= 80);
2. times forward+backward of a ViT-S/16-sized MoE layer (D=384, H=1536, 32 x 197 tokens, K=2, E=8) eager
   sorted, eager static, compiled static, against the dense Mlp on K*B*T tokens;
3. times a training step (AdamW, bf16 autocast) of V-MoE-S/16 (E=8, every-2) against the dense ViT-S/16,
   eager and compiled;

and prints every time with its ratio to the dense counterpart.

    python scripts/gpu_check.py [--batch 32] [--repeats 10] [--no-compile]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from timm.layers import Mlp


def _timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() after two warm-up calls (compilation), synchronised."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_paths(device: torch.device) -> None:
    from vmoe.moe import MoEMlp

    torch.manual_seed(0)
    layer = MoEMlp(384, 1536, num_experts=8, k=2, capacity_factor=1.05).to(device).eval()
    x = torch.randn(8, 197, 384, device=device)
    results = {}
    for name in ("sorted", "static", "reference"):
        layer.dispatch = name
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().mean().backward()
        results[name] = (y.float(), xi.grad, layer.experts.fc1_weight.grad.clone())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        path = layer.experts.sorted_path(x)
    print(f"bf16 autocast: sorted path runs {path!r} "
          f"(expected 'grouped' on SM >= 80, capability {torch.cuda.get_device_capability(device)})")
    ref = results["reference"]
    for name in ("sorted", "static"):
        errs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(results[name], ref)]
        ok = all(e < 5e-2 for e in errs)
        print(f"  {name:>6} vs reference loop, max relative error (out, dx, dW1): "
              + ", ".join(f"{e:.1e}" for e in errs) + ("  OK" if ok else "  MISMATCH"))
        if not ok:
            raise SystemExit(f"{name} path disagrees with the reference loop in bf16")


def time_layer(device: torch.device, repeats: int, compile_: bool) -> None:
    from vmoe.moe import MoEMlp

    b, t, d, h, k = 32, 197, 384, 1536, 2
    x = torch.randn(b, t, d, device=device)

    def step_fn(module, inp):
        def run():
            module.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = module(inp)
            out.float().sum().backward()
        return run

    dense = _timed(step_fn(Mlp(d, h).to(device), torch.randn(k * b, t, d, device=device)), repeats)
    print(f"MoE layer fwd+bwd, bf16 autocast (dense Mlp on K*B*T tokens: {dense * 1e3:.2f} ms)")
    variants = [("sorted", False), ("static", False)] + ([("static", True)] if compile_ else [])
    for dispatch, compiled in variants:
        layer = MoEMlp(d, h, num_experts=8, k=k, capacity_factor=1.05, dispatch=dispatch).to(device)
        if compiled:
            layer.compile(fullgraph=True)
        sec = _timed(step_fn(layer, x), repeats)
        label = dispatch + (" compiled" if compiled else " eager")
        print(f"  {label:>16}: {sec * 1e3:8.2f} ms  ({sec / dense:.2f}x dense)")


def time_models(device: torch.device, batch: int, repeats: int, compile_: bool) -> None:
    import timm

    from vmoe.models import aux_loss, create_vmoe

    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def train_step(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images), labels) + aux_loss(model)
            loss.backward()
            opt.step()
        return run

    print(f"train step, batch {batch} at 224 px, bf16 autocast, AdamW")
    for compiled in (False, True) if compile_ else (False,):
        dense = timm.create_model("vit_small_patch16_224").to(device)
        moe = create_vmoe("vit_small_patch16_224", moe_layers="every-2", num_experts=8, k=2).to(device)
        if compiled:
            dense.compile()
            moe.compile()
        td, tm = _timed(train_step(dense), repeats), _timed(train_step(moe), repeats)
        label = "compiled" if compiled else "eager"
        print(f"  {label:>8}: ViT-S/16 {td * 1e3:8.1f} ms, V-MoE-S/16 E=8 {tm * 1e3:8.1f} ms  ({tm / td:.2f}x dense)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    device = torch.device("cuda")
    print(f"GPU check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    check_paths(device)
    time_layer(device, args.repeats, not args.no_compile)
    time_models(device, args.batch, args.repeats, not args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
