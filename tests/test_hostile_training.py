"""Careless inputs to training, run as the user would: resuming NaN weights, Mixup/CutMix settings from YAML,
Ctrl-C during `vmoe fit` (where last.ckpt is, how to resume) and what a fit/test prints (no repeated
weights_only lines, no tips, no dirpath warning on `vmoe test`)."""
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import lightning
import pytest
import torch

from hostile import ROOT
from vmoe.train.callbacks import resume_command
from vmoe.cli import main
from vmoe.train.module import ImageClassifier

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["--config", QUICKSTART, "--data.init_args.img_size", "8", "--data.init_args.batch_size", "64",
        "--model.model_kwargs", '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}',
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu"]


def test_resume_from_nan_weights_is_refused_like_load_weights(tmp_path, capsys):
    module = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1,
                             moe_layers="every-2", num_experts=8, k=2,
                             model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))
    state = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    ckpt = tmp_path / "diverged.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams), "epoch": 0, "global_step": 3,
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    assert main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"vmoe fit: error: --ckpt_path {re.escape(str(ckpt))}: \d+ of {len(state)} tensors hold NaN or "
                     r"infinite values(.|\n)*use an earlier checkpoint of the run", err), err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("setting, value, message", [
    ("mixup_alpha", ".nan", "mixup_alpha must be >= 0, got nan"),
    ("cutmix_alpha", ".inf", "cutmix_alpha must be >= 0, got inf"),
    ("mixup_alpha", "-0.2", "mixup_alpha must be >= 0, got -0.2"),
    ("mixup_prob", ".nan", r"mixup_prob must be a probability in \[0, 1\], got nan"),
    ("mixup_switch_prob", "1.5", r"mixup_switch_prob must be a probability in \[0, 1\], got 1.5"),
])
def test_mixup_settings_from_yaml_are_refused_by_name(tmp_path, capsys, setting, value, message):
    extra = tmp_path / "mixup.yaml"
    extra.write_text(f"model:\n  {setting}: {value}\n")
    assert main(["fit", *TINY, "--config", str(extra), "--trainer.default_root_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "AssertionError" not in err, err


def test_resume_command_replaces_ckpt_path():
    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=x", "--trainer.max_epochs", "3"]
    assert resume_command("runs/v0/checkpoints/last.ckpt", argv) == (
        "vmoe fit --config 'a b.yaml' --trainer.max_epochs 3 --ckpt_path runs/v0/checkpoints/last.ckpt")


def test_ctrl_c_during_fit_prints_last_ckpt_and_the_resume_command_and_output_is_quiet(tmp_path):
    root = tmp_path / "run"
    args = ["fit", *TINY, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1000",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VMOE_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "vmoe", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a few more epochs: the epochs re-save last.ckpt, printing nothing
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert last.exists(), out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    assert f"the latest saved state is {last}" in out, out[-3000:]
    assert f"Resume with:\n  vmoe fit --config {QUICKSTART}" in out and f"--ckpt_path {last}" in out, out[-3000:]
    assert "weights_only" not in out and "Tip:" not in out and "litlogger" not in out, out[-3000:]
    # resuming from it works with weights_only=True loading (what the CLI now asks Lightning for)
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert main([*args[:-6], "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.max_epochs", str(epoch + 2), "--ckpt_path", str(last)]) == 0
    resumed = root / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"  # the resumed run's own version
    assert torch.load(resumed, weights_only=True)["epoch"] == epoch + 1
    # `vmoe test` of that checkpoint: no dirpath warning (it always logs into a new version directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["test", *TINY, "--trainer.default_root_dir", str(root), "--ckpt_path", str(last),
                     "--trainer.limit_test_batches", "1"]) == 0
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
