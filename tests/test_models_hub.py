"""save_pretrained / timm local-dir round trip, the generic "vmoe" name, V-MoE weights through the registry
filter, and `vmoe export` of a Lightning checkpoint."""
import json
import os

import lightning
import pytest
import timm
import torch
import yaml

import vmoe  # noqa: F401  (registers the timm names)
from vmoe.models import create_vmoe, moe_block_indices, save_pretrained
from vmoe.cli import main
from vmoe.train.module import ImageClassifier

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def _same_outputs(a, b, in_chans):
    x = torch.randn(3, in_chans, 16, 16)
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_create_vmoe_model_is_named_vmoe_and_round_trips_through_local_dir(tmp_path):
    model = create_vmoe("vit_tiny_patch16_224", moe_layers=[1, 3], num_experts=[4, 8], k=1, capacity_factor=2.0,
                        eval_capacity_factor=0.5, batch_priority=True, in_chans=1, **TINY_VIT)
    assert model.pretrained_cfg["architecture"] == "vmoe"  # not the dense vit_tiny_patch16_224
    save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "vmoe" and config["model_args"]["backbone"] == "vit_tiny_patch16_224"
    assert config["model_args"]["num_experts"] == [4, 8] and config["model_args"]["moe_layers"] == [1, 3]

    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert moe_block_indices(loaded) == [1, 3]
    assert [loaded.blocks[i].mlp.num_experts for i in (1, 3)] == [4, 8]
    layer = loaded.blocks[1].mlp
    s = layer.settings
    assert (s.k, s.capacity_factor, s.eval_capacity_factor, s.batch_priority) == (1, 2.0, 0.5, True)
    assert _same_outputs(model, loaded, 1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_registry_name_loads_vmoe_weights_as_they_are(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("vmoe_timm_ti16_e8_every2", **TINY_VIT)
    save_pretrained(model, tmp_path)
    # Before the fix the upcycle filter rejected V-MoE weights; now they load unchanged.
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert loaded.pretrained_cfg["architecture"] == "vmoe_timm_ti16_e8_every2"
    assert _same_outputs(model, loaded, 3)
    # the file route of the registry too (num_classes=10: else timm resets the head of "1000-class" weights);
    # upcycle arguments make no sense for V-MoE weights
    again = timm.create_model("vmoe_timm_ti16_e8_every2", pretrained=True, **TINY_VIT,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=10))
    assert _same_outputs(model, again, 3)
    with pytest.raises(ValueError, match="already a V-MoE"):
        timm.create_model("vmoe_timm_ti16_e8_every2", pretrained=True, expert_noise=0.1, **TINY_VIT,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))


def test_generic_name_builds_and_upcycles_dense_weights(tmp_path):
    dense = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    save_pretrained(dense, tmp_path)  # a dense ViT saves under its own name
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    model = timm.create_model("vmoe", backbone="vit_tiny_patch16_224", moe_layers="every-2", num_experts=4,
                              pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                              **TINY_VIT)
    assert moe_block_indices(model) == [1, 3]
    for e in range(4):
        assert torch.equal(model.blocks[1].mlp.experts.fc1_weight[e], dense.blocks[1].mlp.fc1.weight)


def test_save_pretrained_errors():
    with pytest.raises(ValueError, match="built by timm"):
        save_pretrained(torch.nn.Linear(2, 2), "unused")
    model = create_vmoe("vit_tiny_patch16_224", **TINY_VIT)
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="dense architecture"):
        save_pretrained(model, "unused")


@pytest.mark.parametrize("moe_layers", ["every-2", None])
def test_export_checkpoint_with_preprocessing(tmp_path, moe_layers, capsys):
    hparams = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, moe_layers=moe_layers,
                   model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))
    if moe_layers:
        hparams["num_experts"] = 4
    module = ImageClassifier(**hparams)
    os.makedirs(tmp_path / "run" / "checkpoints")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    data = {"class_path": "vmoe.train.data.DigitsDataModule", "init_args": {"img_size": 16}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": hparams, "data": data}))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hub")]) == 0
    assert "preprocessing from" in capsys.readouterr().out
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    assert _same_outputs(module.model, loaded, 1)
    cfg = timm.data.resolve_data_config(model=loaded)
    assert cfg["mean"] == pytest.approx((0.3053,)) and cfg["std"] == pytest.approx((0.3760,))  # digits, not 0.5
    assert cfg["input_size"] == (1, 16, 16)
    # digits are upscaled bilinearly as whole images: no crop, not timm's ViT defaults (crop_pct 0.9, bicubic)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
