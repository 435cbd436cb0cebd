"""The `vmoe` entry point: help, extra commands, ckpt hyper-parameters, and fit -> test at another capacity."""
import csv
import sys
from pathlib import Path

import pytest
import torch

from vmoe.train import cli
from vmoe.train.cli import explicit_model_keys, main, run

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


def test_help_lists_the_lightning_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.LIGHTNING_COMMANDS:
        assert name in out
    assert "vmoe --help lists every command" in out


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
    # Evaluations log next to the checkpoint (run_layout), numbered per checkpoint and command.
    evals = tmp_path / "run" / "lightning_logs" / "version_0" / "eval" / "test-last"
    low = _last_metrics(evals / "version_0")
    # eval cf 4.0: capacity 320 >= every assignment an expert can get: nothing dropped. Given in a config
    # file this time: the evaluation routing of the command wins over the checkpoint's there too.
    extra = tmp_path / "eval.yaml"
    extra.write_text("model:\n  eval_capacity_factor: 4.0\n")
    main(["test", *TINY, "--config", str(extra), "--trainer.default_root_dir", root, "--ckpt_path", str(last),
          "--trainer.limit_test_batches", "1"])
    high = _last_metrics(evals / "version_1")
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
    assert (tmp_path / "ft" / "lightning_logs" / "version_0" / "eval" / "test-last" / "version_0" / "metrics.csv").is_file()
    # visualize / sweep rebuild the same classifier from the checkpoint (one shared function): an upcycled
    # checkpoint (upcycle_kwargs set, its dense source gone) must load there too.
    from vmoe.viz.cli import sweep, visualize
    written = visualize(["--ckpt_path", str(last), "--out", str(tmp_path / "viz"), "--num_images", "2",
                         "--capacity_factors", "1.0", "--max_batches", "1"])
    assert "expert_load" in written
    rows = sweep(["--ckpt_path", str(last), "--out", str(tmp_path / "viz"), "--capacity_factors", "1.0",
                  "--max_batches", "1"])
    assert rows and 0 <= rows[0]["accuracy"] <= 1


def _ckpt(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def test_last_ckpt_is_the_latest_state_and_best_is_kept(tmp_path):
    """3 epochs of 2 steps; the "best" monitor is chosen so that it stays at an early epoch (highest val/loss),
    where Lightning's save_last would leave last.ckpt too."""
    root = str(tmp_path / "run")
    done = run(["fit", *TINY, "--trainer.default_root_dir", root, "--trainer.max_epochs", "3",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "max"])
    ckpt_dir = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    last = _ckpt(ckpt_dir / "last.ckpt")
    assert last["global_step"] == 6 and last["epoch"] == 2
    final = done.model.state_dict()
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final.items())
    best, = ckpt_dir.glob("best-*.ckpt")
    assert _ckpt(best)["global_step"] < 6  # the best is another, earlier state, kept beside last.ckpt
    # A stop inside an epoch (max_steps) ends fit with last.ckpt at that step too.
    run(["fit", *TINY, "--trainer.default_root_dir", root, "--trainer.max_steps", "3",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    assert _ckpt(tmp_path / "run" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_save_last_is_switched_off_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="checkpoint.save_last is switched off"):
        done = run(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
                    "--trainer.limit_val_batches", "0", "--checkpoint.save_last", "true"])
    assert done.trainer.checkpoint_callback.save_last is False


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.max_epoch", "1", "--print_config"])
    assert exit_info.value.code == 2
    assert "--trainer.max_epoch" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_evaluating_without_weights_is_refused(tmp_path, capsys, command):
    assert main([command, *TINY, "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"vmoe {command}: error: no weights to evaluate: pass --ckpt_path" in err
    assert "--allow_random_weights true" in err and "Traceback" not in err
    assert not (tmp_path / "lightning_logs").exists()  # refused before anything ran


def test_random_weights_on_purpose(tmp_path):
    done = run(["test", *TINY, "--trainer.default_root_dir", str(tmp_path), "--allow_random_weights", "true",
                "--trainer.limit_test_batches", "1"])
    assert "test/acc1" in done.trainer.callback_metrics


def test_errors_are_one_line_and_the_traceback_is_behind_vmoe_debug(tmp_path, capsys, monkeypatch):
    args = ["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--model.num_experts", "0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "vmoe fit: error: num_experts must be an integer >= 1, got 0\n" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # "Seed set to 0", the error, the VMOE_DEBUG hint
    monkeypatch.setenv("VMOE_DEBUG", "1")
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1"):
        main(args)


def test_console_exit_status_of_an_error(tmp_path):
    import os
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VMOE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "vmoe.train.cli", "fit", *TINY, "--model.num_experts", "0",
                           "--trainer.default_root_dir", str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "vmoe fit: error: num_experts must be an integer >= 1" in proc.stderr


def test_fit_with_two_processes_finishes_and_reports_once(tmp_path):
    """The fit report asks Lightning for trainer.log_dir, a broadcast under DDP: every rank must join it, or
    rank 0 waits on a rank that has exited and `vmoe fit` fails after training (gloo: connection closed)."""
    import os
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("VMOE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "vmoe.train.cli", "fit", *TINY, "--trainer.devices", "2",
                           "--trainer.strategy", "ddp_expert_parallel", "--data.init_args.batch_size", "32",
                           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                           "--trainer.limit_val_batches", "1",
                           "--trainer.default_root_dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert proc.stdout.count("logs and config.yaml: ") == 1, proc.stdout  # rank 0 prints, rank 1 does not
    assert f"logs and config.yaml: {log_dir}" in proc.stdout
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()


def _bad_file(tmp_path, how):
    if how == "missing":
        return tmp_path / "nope" / "last.ckpt", "no such checkpoint file"
    if how == "empty":
        (tmp_path / "e.ckpt").write_bytes(b"")
        return tmp_path / "e.ckpt", "(0 bytes): the file is empty"
    if how == "random.pth":
        (tmp_path / "r.pth").write_bytes(bytes(range(256)) * 4)
        return tmp_path / "r.pth", "not a torch checkpoint: neither a torch.save zip archive nor a pickle"
    if how == "truncated":
        torch.save({"state_dict": {"a": torch.zeros(1000)}, "hyper_parameters": {}}, tmp_path / "t.ckpt")
        data = (tmp_path / "t.ckpt").read_bytes()
        (tmp_path / "t.ckpt").write_bytes(data[:len(data) // 2])
        return tmp_path / "t.ckpt", "the torch.save archive is damaged or truncated"
    if how == "weights":
        from safetensors.torch import save_file
        save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        return tmp_path / "w.safetensors", "pass --model.checkpoint_path instead"
    torch.save({"a": torch.zeros(2)}, tmp_path / "sd.ckpt")  # a bare state dict
    return tmp_path / "sd.ckpt", "is not a Lightning checkpoint of an ImageClassifier"


@pytest.mark.parametrize("how", ["missing", "empty", "random.pth", "truncated", "weights", "state_dict"])
@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_bad_ckpt_path_names_the_file_and_the_cause(tmp_path, capsys, command, how):
    path, cause = _bad_file(tmp_path, how)
    assert main([command, *TINY, "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"vmoe {command}: error: --ckpt_path" in err and str(path) in err and cause in err, err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_no_private_lightning_cli_methods_are_overridden():
    """VMoECLI customises LightningCLI through its public hooks only, so a Lightning release that renames
    private methods cannot silently switch our behaviour off."""
    from lightning.pytorch.cli import LightningCLI
    private = [name for name in vars(cli.VMoECLI) if name.startswith("_") and not name.startswith("__")
               and hasattr(LightningCLI, name)]
    assert private == []
    for hook in ("init_parser", "add_arguments_to_parser", "parse_arguments", "before_instantiate_classes",
                 "instantiate_trainer"):
        assert hook in vars(cli.VMoECLI) and hasattr(LightningCLI, hook), hook
