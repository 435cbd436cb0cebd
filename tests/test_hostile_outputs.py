"""Hostile files and careless inputs around the multi-file outputs: `vmoe convert` / `vmoe export` killed
mid-write, a config.yaml beside a checkpoint that names foreign code, NaN weights exported, and strings in a
Hub config.json where booleans belong."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import timm
import torch
import yaml

import vmoe  # noqa: F401  (registers the timm names)
from hostile import ROOT
from reference_writer import random_tree, write_checkpoint
from vmoe.models import create_vmoe, save_pretrained
from vmoe.cli import main
from vmoe.train.module import ImageClassifier

HPARAMS = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, moe_layers="every-2",
               num_experts=4, model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))
DIGITS = {"class_path": "vmoe.train.data.DigitsDataModule", "init_args": {"img_size": 16}}


def _run_dir(tmp_path, data=DIGITS, nan=False) -> Path:
    """<tmp>/run/checkpoints/last.ckpt of a tiny ImageClassifier, with the run's config.yaml beside it."""
    module = ImageClassifier(**HPARAMS)
    state = module.state_dict()
    if nan:
        state = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    os.makedirs(tmp_path / "run" / "checkpoints", exist_ok=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": HPARAMS, "data": data}))
    return ckpt


def _kill_when_printed(code: str, marker: str) -> subprocess.CompletedProcess:
    """Run ``python -c code``; SIGKILL it as soon as it prints ``marker`` (it then sleeps, mid-write)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    return proc


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_convert_killed_between_files_leaves_the_previous_conversion_whole(tmp_path):
    write_checkpoint(tmp_path / "a", random_tree(classes=3))
    write_checkpoint(tmp_path / "b", random_tree(classes=5, experts=8, seed=1))
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "a"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = ("import time, vmoe.models.jax_checkpoint.cli as c\n"
            "orig = c._write_text\n"
            "def slow(path, text):\n"
            "    orig(path, text)\n"
            "    if path.name == 'config.json':\n"
            "        print('WROTE config.json', flush=True); time.sleep(600)\n"
            "c._write_text = slow\n"
            "from vmoe.cli import main\n"
            f"main(['convert', {str(tmp_path / 'b')!r}, '--out', {str(out)!r}])\n")
    _kill_when_printed(code, "WROTE config.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old weights with old configs, nothing mixed
    (leftover,) = _leftovers(out)
    assert sorted(os.listdir(tmp_path / leftover)) == ["config.json", "model.safetensors"]
    assert main(["convert", str(tmp_path / "b"), "--out", str(out)]) == 0
    assert _leftovers(out) == []  # the next run removed the killed run's folder
    config = json.loads((out / "config.json").read_text())
    assert config["reference_architecture"]["num_classes"] == 5 and config["create_vmoe"]["num_experts"] == 8
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "model.yaml"]


def test_export_killed_mid_write_leaves_nothing_half_written(tmp_path):
    ckpt = _run_dir(tmp_path)
    out = tmp_path / "hub"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = ("import time, timm.models\n"
            "orig = timm.models.save_for_hf\n"
            "def slow(model, folder, **kw):\n"
            "    orig(model, folder, **kw)\n"
            "    print('WROTE', sorted(__import__('os').listdir(folder)), flush=True); time.sleep(600)\n"
            "timm.models.save_for_hf = slow\n"
            "from vmoe.cli import main\n"
            f"main(['export', {str(ckpt)!r}, '--out', {str(out)!r}])\n")
    _kill_when_printed(code, "WROTE")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(_leftovers(out)) == 1 and not any(p.name.startswith(".") for p in out.iterdir())
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert _leftovers(out) == [] and sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_export_does_not_run_code_named_in_a_config_beside_the_checkpoint(tmp_path, capsys):
    target = tmp_path / "pwned"
    ckpt = _run_dir(tmp_path, data={"class_path": "os.mkdir", "init_args": {"path": str(target)}})
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hub")]) == 1
    err = capsys.readouterr().err
    assert "data: class_path 'os.mkdir' is not one of vmoe's classes" in err and "--allow_class os.mkdir" in err
    assert not target.exists() and not (tmp_path / "hub").exists()
    # allowed explicitly, it must still be a LightningDataModule: imported, never called
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hub"), "--allow_class", "[os.mkdir]"]) == 1
    assert "not a subclass of lightning.pytorch.core.datamodule.LightningDataModule" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "hub").exists()
    # fewshot/visualize: a foreign class beside the checkpoint is not used (a note says so)
    from vmoe.train.from_checkpoint import data_defaults_from_checkpoint
    from jsonargparse import ArgumentParser
    parser = ArgumentParser()
    parser.add_argument("--data", default=None)
    assert data_defaults_from_checkpoint(parser, str(ckpt), None) is None and parser.get_defaults().data is None
    assert "names data class_path 'os.mkdir', which is not one of vmoe's classes" in capsys.readouterr().err


def test_export_converts_config_values_like_the_cli(tmp_path, capsys):
    ckpt = _run_dir(tmp_path, data={"class_path": "DigitsDataModule", "init_args": {"img_size": "16"}})
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hub")]) == 0  # "16" -> 16, as the CLI reads it
    assert "input (1, 16, 16)" in capsys.readouterr().out
    ckpt = _run_dir(tmp_path, data={"class_path": "DigitsDataModule", "init_args": {"img_size": "sixteen"}})
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hub2")]) == 1
    assert "config.yaml: data: init_args of vmoe.train.data.digits.DigitsDataModule" in capsys.readouterr().err


def test_export_refuses_nan_weights(tmp_path, capsys):
    ckpt = _run_dir(tmp_path, nan=True)
    # the --ckpt_path reader refuses it first (the same check as load_weights), before anything is written
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hub")]) == 1
    err = capsys.readouterr().err
    assert "tensors hold NaN or infinite values" in err and "model.blocks.0.attn.qkv.weight" in err
    assert not (tmp_path / "hub").exists()
    model = create_vmoe("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                        num_classes=3)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"save_pretrained\(.*nope\): 1 of .* tensors hold NaN or infinite values"
                                         r"(.|\n)*head.weight: 1 of 96 values"):
        save_pretrained(model, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("value, want", [("false", False), ("true", True), (False, False)])
def test_hub_config_strings_are_converted_like_the_cli(tmp_path, value, want):
    model = create_vmoe("vit_tiny_patch16_224", moe_layers=[1], num_experts=4, img_size=16, patch_size=4,
                        embed_dim=32, depth=2, num_heads=2, num_classes=3, bfloat16_dispatch=True,
                        moe_kwargs={"importance_weight": 0.25})
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["bfloat16_dispatch"] = value
    config["model_args"]["batch_priority"] = value
    config["model_args"]["moe_kwargs"]["importance_weight"] = "0.5"  # a block argument: the block's type hint
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    settings = loaded.blocks[1].mlp.settings
    assert settings.bfloat16_dispatch is want and settings.batch_priority is want
    assert loaded.blocks[1].mlp.router.importance_weight == 0.5
    config["model_args"]["bfloat16_dispatch"] = "nope"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"MoE setting bfloat16_dispatch='nope' is not a valid bool \(read as"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
