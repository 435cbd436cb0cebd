"""torch.compile(fullgraph=True) and torch.export of a whole tiny V-MoE, and ``--model.compile`` in the CLI.

Compilation is the cost here, so the model is tiny and there is one compile of each kind.
"""
import warnings

import torch
import torch._inductor.config as inductor_config

from vmoe.models import aux_loss, create_vmoe


def tiny_vmoe():
    torch.manual_seed(0)
    return create_vmoe("vit_tiny_patch16_224", moe_layers="every-2", num_experts=4, k=2, img_size=16,
                       patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, capacity_factor=0.5)


def step(model, x):
    model.zero_grad()
    torch.manual_seed(1)  # the same router noise in both runs (inductor told to draw it like eager)
    y = model(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + aux_loss(model)
    loss.backward()
    layer = model.blocks[1].mlp
    params = getattr(model, "_orig_mod", model).named_parameters()
    return y.detach(), {n: p.grad.clone() for n, p in params}, dict(layer.metrics)


def test_compile_fullgraph_forward_backward_equals_eager():
    model = tiny_vmoe().train()
    x = torch.randn(3, 3, 16, 16)
    y_eager, g_eager, m_eager = step(model, x)  # eager CPU: the sorted dispatch
    assert m_eager["dropped_fraction"] > 0  # capacity 0.5: the static buffers really drop assignments
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    with inductor_config.patch(fallback_random=True):
        y_comp, g_comp, m_comp = step(compiled, x)
    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], atol=1e-5, rtol=1e-5, msg=name)
    assert g_comp["blocks.1.mlp.router.weight"].abs().sum() > 0
    for key in ("tokens_per_expert", "dropped_fraction", "load_cv"):  # attribute writes survive compiling
        torch.testing.assert_close(m_comp[key], m_eager[key], msg=key)


def test_export_eval_model_equals_eager():
    model = tiny_vmoe().eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "tensor attributes assigned during export"
        program = torch.export.export(model, (x,))
    x2 = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), model(x2), atol=1e-5, rtol=1e-5)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.baddbmm.default" in ops  # the static-capacity path
    assert not any("bincount" in op or "nonzero" in op or "_local_scalar_dense" in op for op in ops)


def test_cli_model_compile(tmp_path):
    from test_train_cli import TINY

    from vmoe.train.cli import main

    from torch._dynamo.utils import counters

    counters.clear()
    root = str(tmp_path / "run")
    main(["fit", *TINY, "--trainer.default_root_dir", root, "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
          "--model.compile", "true", "--model.compile_kwargs", '{"backend": "aot_eager", "fullgraph": true}'])
    ckpt = torch.load(tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["compile"] is True
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled, one graph
    assert any(k.startswith("model.blocks.1.mlp.experts.") for k in ckpt["state_dict"])  # names unchanged
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


def test_gpu_check_runs_and_says_it_skipped_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if torch.cuda.is_available():
        assert "vs reference loop" in out.stdout and "MISMATCH" not in out.stdout
    else:
        assert out.stdout.strip() == "skipped: no CUDA"
