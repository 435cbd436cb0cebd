"""`vmoe convert`: the written weights + configs load through create_vmoe, load_weights, timm's pretrained
path and `vmoe fit/test` (fine-tuning to another class count, image size and channel count)."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from vmoe.models import create_vmoe, load_reference, load_weights
from vmoe.models.ensemble import EnsemblePreLogitsViT
from vmoe.cli import main

DATA = Path(__file__).parent / "data" / "vmoe_reference"


def _ref(name, cf=1.0):
    x = torch.from_numpy(np.load(DATA / name / "inputs.npz")["images_nchw"])
    return x, np.load(DATA / name / f"ref_cf{cf}_bpr0_bf160.npz")["logits"]


@pytest.mark.parametrize("name,group_size", [("rep32", 68), ("eee16", 68)])
def test_convert_then_create_vmoe_timm_and_load_weights(tmp_path, name, group_size):
    out = tmp_path / "out"
    main(["convert", str(DATA / name / "ckpt"), "--out", str(out), "--group_size", str(group_size),
          "--capacity_factor", "1.0"])
    config = json.loads((out / "config.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "model.yaml"]
    assert config["format"] == "vmoe-convert/1" and config["architecture"]["img_size"] in (16, 32)
    x, want = _ref(name)
    ensemble = name == "eee16"

    def check(model):
        model.eval()
        with torch.no_grad():
            got = model.forward_members(x).flatten(0, 1) if ensemble else model(x)
        assert np.abs(got.numpy() - want).max() < 1e-4

    check(create_vmoe(**config["create_vmoe"], checkpoint_path=out / "model.safetensors"))
    fresh = create_vmoe(**config["create_vmoe"])
    check(load_weights(fresh, out / "model.safetensors"))
    model = timm.create_model(config["timm"]["model_name"], pretrained=True,
                              pretrained_cfg_overlay=config["timm"]["pretrained_cfg_overlay"], **config["timm"]["kwargs"])
    assert isinstance(model, EnsemblePreLogitsViT) == ensemble
    check(model)


def test_timm_pretrained_at_a_new_image_size_and_class_count(tmp_path):
    main(["convert", str(DATA / "tiny16" / "ckpt"), "--out", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    source = load_reference(DATA / "tiny16" / "ckpt")
    kwargs = {**config["timm"]["kwargs"], "img_size": 32, "num_classes": 7}
    model = timm.create_model("vmoe_reference", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                              **kwargs)
    assert model.pos_embed.shape == (1, 65, 32) and model.head.weight.shape == (7, 32)
    assert torch.equal(model.blocks[3].mlp.experts.fc2_weight, source.blocks[3].mlp.experts.fc2_weight)
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # class token position kept


def test_fine_tune_a_converted_checkpoint_with_vmoe_fit_and_test(tmp_path):
    from test_train_cli import TINY, _last_metrics

    # rep32: 32 px RGB, 5 classes -> the digits: 8 px grayscale, 10 classes
    main(["convert", str(DATA / "rep32" / "ckpt"), "--out", str(tmp_path / "conv")])
    source = load_reference(DATA / "rep32" / "ckpt")
    root = tmp_path / "ft"
    main(["fit", *TINY, "--config", str(tmp_path / "conv" / "model.yaml"), "--trainer.default_root_dir", str(root),
          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--model.lr", "1e-9"])
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    state = ckpt["state_dict"]
    assert state["model.head.weight"].shape == (10, 48) and state["model.pos_embed"].shape == (1, 2, 48)
    assert state["model.patch_embed.proj.weight"].shape == (48, 1, 8, 8)
    assert ckpt["hyper_parameters"]["backbone"] == "vmoe_vit_prelogits"
    for key in ("blocks.3.mlp.experts.fc1_weight", "blocks.0.attn.qkv.weight", "pre_logits.fc.weight"):
        assert torch.allclose(state[f"model.{key}"], source.state_dict()[key], atol=1e-6), key
    (tmp_path / "conv" / "model.safetensors").unlink()  # testing the fine-tuned .ckpt needs no converted file
    main(["test", *TINY, "--config", str(tmp_path / "conv" / "model.yaml"), "--trainer.default_root_dir", str(root),
          "--ckpt_path", str(last),
          "--trainer.limit_test_batches", "1"])
    assert 0 <= _last_metrics(root / "lightning_logs" / "version_0" / "eval" / "test-last" / "version_0")["test/acc1"] <= 1


def test_convert_refuses_a_missing_checkpoint_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VMOE_DEBUG", raising=False)
    assert main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert "vmoe convert: error: FileNotFoundError" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("VMOE_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nope.index"):
        main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
