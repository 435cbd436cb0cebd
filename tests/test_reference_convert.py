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
    assert config["format"] == "vmoe-convert/2" and config["reference_architecture"]["img_size"] in (16, 32)
    size = config["reference_architecture"]["img_size"]
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
    moved = tmp_path / "elsewhere"
    out.rename(moved)  # the configs name their weights relative to their folder
    model = timm.create_model(f"local-dir:{moved}", pretrained=True)
    assert isinstance(model, EnsemblePreLogitsViT) == ensemble
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, size, size)
    check(model)
    assert str(tmp_path) not in (moved / "config.json").read_text().replace(config["source"], "")


def test_timm_pretrained_at_a_new_image_size_and_class_count(tmp_path):
    main(["convert", str(DATA / "tiny16" / "ckpt"), "--out", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    source = load_reference(DATA / "tiny16" / "ckpt")
    kwargs = {**config["model_args"], "img_size": 32, "num_classes": 7}
    model = timm.create_model("vmoe_reference", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                              **kwargs)
    assert model.pos_embed.shape == (1, 65, 32) and model.head.weight.shape == (7, 32)
    assert torch.equal(model.blocks[3].mlp.experts.fc2_weight, source.blocks[3].mlp.experts.fc2_weight)
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # class token position kept


def test_fine_tune_a_converted_checkpoint_with_vmoe_fit_and_test(tmp_path, monkeypatch, capsys):
    from test_train_cli import TINY, _last_metrics

    # rep32: 32 px RGB, 5 classes -> the digits: 8 px grayscale, 10 classes
    main(["convert", str(DATA / "rep32" / "ckpt"), "--out", str(tmp_path / "conv")])
    source = load_reference(DATA / "rep32" / "ckpt")
    root = tmp_path / "ft"
    monkeypatch.chdir(tmp_path / "ft_cwd" if (tmp_path / "ft_cwd").mkdir() is None else tmp_path)  # not conv/
    assert main(["fit", *TINY, "--config", str(tmp_path / "conv" / "model.yaml"), "--trainer.default_root_dir",
                 str(root), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--model.lr", "1e-9"]) == 0
    err = capsys.readouterr().err  # the adaptation lines reach the command's output
    assert "pos_embed resampled from (1, 17, 48) to (1, 2, 48)" in err and "head reset to the model's 10 classes" in err
    assert "adapted from 3 to 1 input channels" in err
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


def test_evaluating_a_reset_head_is_refused_unless_asked(tmp_path, capsys, monkeypatch):
    from test_train_cli import TINY

    monkeypatch.delenv("VMOE_DEBUG", raising=False)
    main(["convert", str(DATA / "rep32" / "ckpt"), "--out", str(tmp_path / "conv")])  # 5 classes; digits: 10
    args = ["test", *TINY, "--config", str(tmp_path / "conv" / "model.yaml"), "--trainer.default_root_dir",
            str(tmp_path / "run"), "--trainer.limit_test_batches", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "head was reset to random weights" in err and "--allow_random_weights true" in err
    assert main([*args, "--allow_random_weights", "true"]) == 0


def test_a_missing_relative_checkpoint_path_names_where_it_looked(tmp_path, capsys, monkeypatch):
    from test_train_cli import TINY

    monkeypatch.delenv("VMOE_DEBUG", raising=False)
    main(["convert", str(DATA / "rep32" / "ckpt"), "--out", str(tmp_path / "conv")])
    (tmp_path / "conv" / "model.safetensors").unlink()
    assert main(["fit", *TINY, "--config", str(tmp_path / "conv" / "model.yaml"), "--trainer.max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "model.checkpoint_path 'model.safetensors' does not exist" in err and str(tmp_path / "conv") in err


@pytest.mark.parametrize("given", ["prefix", "index", "folder", "data"])
def test_convert_takes_a_prefix_its_index_or_its_folder(tmp_path, given):
    folder = DATA / "tiny16"
    source = {"prefix": folder / "ckpt", "index": folder / "ckpt.index", "folder": folder,
              "data": folder / "ckpt.data-00000-of-00001"}[given]
    out = main(["convert", str(source), "--out", str(tmp_path / "out")])
    assert out == 0 and json.loads((tmp_path / "out" / "config.json").read_text())["source"] == str(folder / "ckpt")


def test_a_wrong_path_says_what_a_prefix_is(tmp_path):
    from vmoe.models.jax_checkpoint import resolve_checkpoint_prefix

    with pytest.raises(FileNotFoundError, match=r"nope.index does not exist; a checkpoint prefix is the path "
                                                r"without its suffixes: ckpts/NAME for ckpts/NAME.index"):
        resolve_checkpoint_prefix(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="a folder without any <prefix>.index"):
        resolve_checkpoint_prefix(tmp_path)
    for name in ("a", "b"):
        for src in (DATA / "tiny16").glob("ckpt.*"):
            (tmp_path / src.name.replace("ckpt", name)).write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"holds 2 checkpoints \(\['a', 'b'\]\): pass one prefix"):
        resolve_checkpoint_prefix(tmp_path)
    assert resolve_checkpoint_prefix(tmp_path / "b.index") == tmp_path / "b"


def test_a_flat_router_checkpoint_named_e3_needs_ensemble_size(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VMOE_DEBUG", raising=False)
    for src in (DATA / "tiny16").glob("ckpt.*"):  # flat [D, E] routers, E=4
        (tmp_path / src.name.replace("ckpt", "eee_s32_tiny")).write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"eee_s32_tiny is named like an E³ checkpoint .* pass ensemble_size=M"):
        load_reference(tmp_path / "eee_s32_tiny")
    assert main(["convert", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "named like an E³ checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert isinstance(load_reference(tmp_path / "eee_s32_tiny", ensemble_size=2), EnsemblePreLogitsViT)
    assert not isinstance(load_reference(tmp_path / "eee_s32_tiny", ensemble_size=1), EnsemblePreLogitsViT)


def test_offline_fine_tuning_config_on_an_image_folder(tmp_path, monkeypatch):
    from test_data_imagefolder import _tree

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune_converted_imagefolder.yaml"
    train, val = _tree(tmp_path / "tree", "train", 4), _tree(tmp_path / "tree", "test", 2)
    main(["convert", str(DATA / "tiny16" / "ckpt"), "--out", str(tmp_path / "conv")])
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(config), "--config", "conv/model.yaml", "--data.init_args.train_dir", str(train),
                 "--data.init_args.val_dir", str(val), "--data.init_args.img_size", "16", "--data.init_args.batch_size",
                 "4", "--data.init_args.num_workers", "0", "--trainer.max_steps", "1", "--trainer.limit_val_batches",
                 "1", "--trainer.val_check_interval", "1", "--trainer.precision", "32-true",
                 "--trainer.default_root_dir", "ft"]) == 0
    state = torch.load(next((tmp_path / "ft").rglob("last.ckpt")), weights_only=True)["state_dict"]
    assert state["model.head.weight"].shape[0] == len(list(train.iterdir()))
