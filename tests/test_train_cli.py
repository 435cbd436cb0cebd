"""The `vmoe` entry point: help, extra commands, ckpt hyper-parameters, and fit -> test at another capacity."""
import csv
import sys
import types
from pathlib import Path

import pytest
import torch

from vmoe.train import cli
from vmoe.train.cli import explicit_model_keys, main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# The quickstart config shrunk: 8x8 digits, patch 4 -> 4 patches + CLS = 5 tokens, width 32, 2 blocks.
TINY = ["--config", QUICKSTART, "--data.init_args.img_size", "8", "--data.init_args.batch_size", "64",
        "--model.model_kwargs", '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}',
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu"]


def _last_metrics(log_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    out = {}
    for row in rows:
        out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def test_help_lists_lightning_and_extra_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", *cli.EXTRA_COMMANDS):
        assert name in out


def test_extra_commands_dispatch_before_lightning(monkeypatch):
    calls = []
    fake = types.ModuleType("fake_vmoe_extra")
    fake.run = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fake_vmoe_extra", fake)
    monkeypatch.setitem(cli.EXTRA_COMMANDS, "hello", "fake_vmoe_extra:run")
    assert main(["hello", "--x", "1"]) == 7 and calls == [["--x", "1"]]
    monkeypatch.setitem(cli.EXTRA_COMMANDS, "broken", "no_such_module_vmoe:run")
    with pytest.raises(SystemExit, match="vmoe broken: cannot import no_such_module_vmoe"):
        main(["broken"])
    monkeypatch.setitem(cli.EXTRA_COMMANDS, "nofunc", "fake_vmoe_extra:missing")
    with pytest.raises(SystemExit, match="has no function 'missing'"):
        main(["nofunc"])


def test_explicit_model_keys():
    argv = ["test", "--model.eval_capacity_factor", "0.5", "--model.batch_priority=true",
            "--model.init_args.k", "1", "--model.moe_kwargs.x", "1", "--trainer.max_steps", "3"]
    assert explicit_model_keys(argv) == {"eval_capacity_factor", "batch_priority", "k", "moe_kwargs"}
    assert explicit_model_keys(["--model", "m.yaml"]) is None


def test_print_config_links_data_into_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "DigitsDataModule" in out and "eval_capacity_factor" in out and "checkpoint:" in out


def test_fit_then_test_at_another_eval_capacity(tmp_path):
    root = str(tmp_path / "run")
    main(["fit", *TINY, "--trainer.default_root_dir", root, "--trainer.max_steps", "4",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "4"])
    ckpt_dir = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert last.is_file() and len(list(ckpt_dir.glob("best-*.ckpt"))) == 1
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["eval_capacity_factor"] is None  # so the value below comes from the CLI
    assert ckpt["hyper_parameters"]["num_classes"] == 10 and ckpt["hyper_parameters"]["img_size"] == 8

    # One test batch = one routing group: 64 images x 5 tokens = 320 tokens, K=2 -> 640 assignments, E=8.
    # eval cf 0.25: capacity ceil(640 * 0.25 / 8) = 20 slots per expert, so at most 160 kept: >= 75 % dropped.
    main(["test", *TINY, "--trainer.default_root_dir", root, "--ckpt_path", str(last),
          "--model.eval_capacity_factor", "0.25", "--trainer.limit_test_batches", "1"])
    low = _last_metrics(tmp_path / "run" / "lightning_logs" / "version_1")
    # eval cf 4.0: capacity 320 >= every assignment an expert can get: nothing dropped. Given in a config
    # file this time: the evaluation routing of the command wins over the checkpoint's there too.
    extra = tmp_path / "eval.yaml"
    extra.write_text("model:\n  eval_capacity_factor: 4.0\n")
    main(["test", *TINY, "--config", str(extra), "--trainer.default_root_dir", root, "--ckpt_path", str(last),
          "--trainer.limit_test_batches", "1"])
    high = _last_metrics(tmp_path / "run" / "lightning_logs" / "version_2")
    assert low["test/moe/block1/dropped_fraction"] >= 0.75
    assert high["test/moe/block1/dropped_fraction"] == 0.0
    for metrics in (low, high):
        assert {"test/loss", "test/acc1", "test/acc5", "test/aux_loss", "test/moe/block1/load_cv"} <= set(metrics)

    out = tmp_path / "pred.csv"
    main(["predict", *TINY, "--trainer.default_root_dir", root, "--ckpt_path", str(last),
          "--trainer.limit_predict_batches", "1", "--predictions.output", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 64 and set(rows[0]) == {"index", "pred", "prob", "target"}
    assert all(0 <= int(r["pred"]) < 10 and 0 < float(r["prob"]) <= 1 for r in rows)


OWN_CONFIGS = ["quickstart", "quickstart_dense", "fashion_mnist_vmoe", "fashion_mnist_dense", "cifar10_vmoe_s",
               "cifar10_dense_s", "imagefolder_vmoe_s32_last2", "imagefolder_dense_s32", "finetune_upcycle",
               "finetune_dense"]


@pytest.mark.parametrize("name", OWN_CONFIGS)
def test_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    dense = "dense" in name
    assert ("moe_layers: null" in out) == dense
    assert f"default_root_dir: runs/{name}" in out


def test_upcycle_through_the_cli_then_test_without_the_dense_file(tmp_path):
    from vmoe.models import save_weights
    from vmoe.train import ImageClassifier

    dense = ImageClassifier("vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1, moe_layers=None,
                            model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))
    weights = save_weights(dense.model, tmp_path / "dense.safetensors")
    root = str(tmp_path / "ft")
    main(["fit", *TINY, "--trainer.default_root_dir", root, "--model.checkpoint_path", str(weights),
          "--model.upcycle_kwargs", '{"expert_noise": 0.0}', "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--model.lr", "1e-9"])
    last = tmp_path / "ft" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True, map_location="cpu")["state_dict"]
    # After one step at lr ~0 every expert still equals the dense MLP it was copied from.
    assert torch.allclose(state["model.blocks.1.mlp.experts.fc1_weight"][3], dense.model.blocks[1].mlp.fc1.weight,
                          atol=1e-6)
    weights.unlink()  # the test run must not need the upcycling source any more
    main(["test", *TINY, "--trainer.default_root_dir", root, "--ckpt_path", str(last),
          "--trainer.limit_test_batches", "1"])
    assert (tmp_path / "ft" / "lightning_logs" / "version_1" / "metrics.csv").is_file()
