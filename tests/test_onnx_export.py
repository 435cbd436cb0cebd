"""ONNX export (vmoe.models.onnx_export): ONNX Runtime equals eager PyTorch within 1e-4 for a V-MoE, a K=1
BPR model, an E³ model and a converted reference checkpoint, at eval capacity 1.0 and 0.5 with BPR (tokens
really dropped); every built-in router exports; a router that cannot export is named. Needs the `onnx`
extra (CI installs it)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from vmoe.models import capture_routing, create_vmoe, load_reference, routing_settings  # noqa: E402
from vmoe.models.onnx_export import OnnxExportError, export_onnx  # noqa: E402
from vmoe.moe import MoEMlp  # noqa: E402
from vmoe.moe.routers import ROUTERS  # noqa: E402
from vmoe.moe.routers.vmoe import NoisyTopKRouter  # noqa: E402

DATA = Path(__file__).parent / "data" / "vmoe_reference"
TOL = 1e-4
def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _check(model, path, x, cf, bpr, **kwargs):
    """Export at (cf, bpr), compare ORT with eager at the same settings; returns (max diff, dropped)."""
    export_onnx(model, path, eval_capacity_factor=cf, batch_priority=bpr, **kwargs)
    with torch.no_grad(), routing_settings(model, eval_capacity_factor=cf, batch_priority=bpr), \
            capture_routing(model) as routes:
        want = model(x)
    dropped = max(float((r.slot_index < 0).float().mean()) for r in routes.values())
    diff = float(np.abs(_run(path, x) - want.numpy()).max())
    print(f"ORT vs eager: max |difference| {diff:.2e}, dropped assignments {dropped:.2f} (eval capacity {cf}, bpr {bpr})")
    assert diff <= TOL, (cf, bpr, diff)
    return diff, dropped


def _tiny(**kwargs):
    """32 px, patch 4: T = 64 patches + CLS = 65 tokens."""
    torch.manual_seed(0)
    return create_vmoe("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                       num_classes=5, moe_layers=[1], num_experts=4, **kwargs).eval()


@pytest.mark.parametrize("cf", [1.0, 0.5])
def test_vmoe_runs_in_onnx_runtime_like_eager(tmp_path, cf):
    model = _tiny(k=2, group_size=65)  # one routing group per image: the batch axis is dynamic
    x = torch.randn(3, 3, 32, 32)
    _, dropped = _check(model, tmp_path / "m.onnx", x, cf, True)
    assert dropped > 0.3 if cf == 0.5 else dropped < 0.3
    meta = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert meta["eval_capacity_factor"] == cf and meta["batch_priority"] is True and meta["dynamic_batch"] is True
    block = model.blocks[1].mlp  # the model itself is left as it was
    assert block.settings.factor(training=False) == 1.05 and not block.settings.batch_priority
    assert block.dispatch.name == "auto" and block.settings.group_size == 65
    other = torch.randn(5, 3, 32, 32)  # another batch size through the same file
    with torch.no_grad(), routing_settings(model, eval_capacity_factor=cf, batch_priority=True):
        assert np.abs(_run(tmp_path / "m.onnx", other) - model(other).numpy()).max() <= TOL


@pytest.mark.parametrize("cf", [1.0, 0.5])
def test_k1_bpr_model_with_whole_batch_groups_has_a_fixed_batch(tmp_path, cf):
    model = _tiny(k=1)  # group_size None: the capacity depends on B, so the batch is fixed at export
    x = torch.randn(4, 3, 32, 32)
    _, dropped = _check(model, tmp_path / "k1.onnx", x, cf, True, batch_size=4)
    assert dropped > 0.3 if cf == 0.5 else dropped < 0.3
    session = ort.InferenceSession(str(tmp_path / "k1.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [4, 3, 32, 32]


def test_a_dynamic_batch_the_capacity_forbids_is_refused(tmp_path):
    with pytest.raises(ValueError, match="group_size=None.*capacity depends on the batch size"):
        export_onnx(_tiny(k=1), tmp_path / "dyn.onnx", dynamic_batch=True)
    with pytest.raises(ValueError, match="group_size=10, which does not divide the 65 tokens"):
        export_onnx(_tiny(k=1), tmp_path / "dyn.onnx", dynamic_batch=True, group_size=10)
    assert not (tmp_path / "dyn.onnx").exists()


@pytest.mark.parametrize("cf", [1.0, 0.5])
def test_e3_model_runs_in_onnx_runtime_like_eager(tmp_path, cf):
    model = _tiny(k=1, router="ensemble", moe_kwargs={"ensemble_size": 2}, group_size=130)
    x = torch.randn(2, 3, 32, 32)
    _, dropped = _check(model, tmp_path / "e3.onnx", x, cf, True)
    assert dropped > 0.3 if cf == 0.5 else dropped < 0.3


@pytest.mark.parametrize("name,cf", [("tiny16", 1.0), ("tiny16", 0.5), ("eee16", 0.5)])
def test_converted_reference_runs_in_onnx_runtime_like_eager_and_jax(tmp_path, name, cf):
    cfg = json.loads((DATA / name / "config.json").read_text())
    x = torch.from_numpy(np.load(DATA / name / "inputs.npz")["images_nchw"])
    model = load_reference(DATA / name / "ckpt", k=cfg["num_selected_experts"], group_size=cfg["group_size"])
    _, dropped = _check(model, tmp_path / "ref.onnx", x, cf, True, batch_size=x.shape[0])
    assert dropped > 0.2 if cf == 0.5 else dropped > 0  # group_size spans images: a fixed batch
    if (cfg["ensemble_size"] or 1) == 1:  # the JAX reference's own logits at the same settings
        ref = np.load(DATA / name / f"ref_cf{cf}_bpr1_bf160.npz")["logits"]
        assert np.abs(_run(tmp_path / "ref.onnx", x) - ref).max() <= TOL


BUILTIN = sorted(n for n, c in ROUTERS.items() if c.__module__.startswith("vmoe.moe.routers"))


class Residual(torch.nn.Module):
    """x + block(x), as in a ViT: a token every choice of which was dropped does not become a zero row
    (whose equal logits would make the next router's top-k a tie, ordered differently by ONNX TopK)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def test_every_builtin_router_exports(tmp_path):
    """One graph with a block per built-in router (one export instead of one per router)."""
    torch.manual_seed(0)
    blocks = []
    for router in BUILTIN:
        kwargs = {"dense": {}, "expert_choice": {}, "switch": {"k": 1}}.get(router, {"k": 2})
        if router == "ensemble":
            kwargs["router_kwargs"] = {"ensemble_size": 2}
        bpr = router not in ("dense", "expert_choice")  # (they have no use for BPR)
        blocks.append(MoEMlp(16, 32, num_experts=4, router=router, eval_capacity_factor=0.5, batch_priority=bpr,
                             dispatch="static", **kwargs))
    chain = torch.nn.Sequential(*(Residual(b) for b in blocks)).eval()
    x = torch.randn(2, 6, 16)
    torch.onnx.export(chain, (x,), dynamo=True, opset_version=18, verbose=False).save(str(tmp_path / "b.onnx"))
    with torch.no_grad():
        assert np.abs(_run(tmp_path / "b.onnx", x) - chain(x).numpy()).max() <= TOL


class StableSortRouter(NoisyTopKRouter):
    """A user router that orders tokens with a stable sort, which ONNX cannot express."""

    def forward(self, x, settings, capacity):
        out = super().forward(x, settings, capacity)
        order = torch.sort(out.routing.combine_weights[..., 0], dim=-1, stable=True).indices
        routing = type(out.routing)(*(torch.gather(t, 1, order.unsqueeze(-1).expand_as(t)) for t in out.routing))
        out.routing = routing
        return out


def test_a_router_that_cannot_export_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(ROUTERS, "stable_sort_test", StableSortRouter)
    model = _tiny(k=2, router="stable_sort_test", group_size=65)
    with pytest.raises(OnnxExportError, match=r"blocks\.1\.mlp \(router StableSortRouter\).*sort"):
        export_onnx(model, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_bad_opset_and_batch_size(tmp_path):
    model = _tiny(k=2)
    with pytest.raises(ValueError, match="opset must be an int >= 18"):
        export_onnx(model, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(ValueError, match="group_size must be"):
        export_onnx(model, tmp_path / "m.onnx", group_size=0)
    e3 = _tiny(k=1, router="ensemble", moe_kwargs={"ensemble_size": 2}, group_size=130)
    with pytest.raises(ValueError, match="group_size=65 must be a multiple of blocks.1.mlp's ensemble_size=2"):
        export_onnx(e3, tmp_path / "m.onnx", group_size=65)
    assert e3.blocks[1].mlp.settings.group_size == 130 and not (tmp_path / "m.onnx").exists()


def test_vmoe_export_format_onnx_cli(tmp_path, capsys):
    import lightning
    import yaml

    from vmoe.cli import main
    from vmoe.train.module import ImageClassifier

    hparams = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, moe_layers="every-2",
                   num_experts=4, model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))
    module = ImageClassifier(**hparams)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    data = {"class_path": "vmoe.train.data.DigitsDataModule", "init_args": {"img_size": 16}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": hparams, "data": data}))
    with pytest.raises(SystemExit):  # routing flags belong to --format onnx
        main(["export", str(ckpt), "--out", str(tmp_path / "hub"), "--model.batch_priority", "true"])
    assert main(["export", str(ckpt), "--out", str(tmp_path / "o"), "--format", "onnx", "--model.eval_capacity_factor",
                 "0.5", "--model.batch_priority", "true", "--model.group_size", "17"]) == 0
    out = capsys.readouterr().out
    assert "batch dynamic, eval_capacity_factor 0.5, batch_priority True, group_size 17" in out
    diff = float(out.split("max |difference| ")[1].split()[0])
    assert diff <= TOL
    meta = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "o" / "model.onnx").metadata_props}
    assert meta["preprocessing"]["input_size"] == [1, 16, 16] and meta["preprocessing"]["mean"] == [pytest.approx(0.3053)]
    x = torch.randn(3, 1, 16, 16)
    network = module.model.eval()
    with torch.no_grad(), routing_settings(network, eval_capacity_factor=0.5, batch_priority=True, group_size=17):
        assert np.abs(_run(tmp_path / "o" / "model.onnx", x) - network(x).numpy()).max() <= TOL
