"""The `vmoe` LightningCLI as a new user meets it: a description for every option, short help, one-line errors
that name the closest valid option, configs that take every router and added callbacks, and evaluations that
leave the run layout alone."""
import argparse
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser, capture_parser

from vmoe.moe import iter_moe_mlps
from vmoe.moe.build import available_routers
from vmoe.train import data as datamodules
from vmoe.train.cli import VMoECLI, main
from vmoe.train.cli_errors import closest, concise_error, innermost_line
from vmoe.train.cli_help import short_help
from vmoe.train.config_layers import dropped_callbacks

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["--data.init_args.img_size", "8", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.model_kwargs", '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}']
DATA_MODULES = [datamodules.DigitsDataModule, datamodules.CIFAR10DataModule, datamodules.CIFAR100DataModule,
                datamodules.FashionMNISTDataModule, datamodules.TimmDataModule, datamodules.ImageFolderDataModule]
VMOE_CONFIGS = ["quickstart", "fashion_mnist_vmoe", "fashion_mnist_vmoe_p4", "cifar10_vmoe_s",
                "imagefolder_vmoe_s32_last2", "finetune_upcycle"]


def _undocumented(parser: ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if any(option.endswith(".help") for option in action.option_strings):
            continue  # "--x.help CLASS": jsonargparse's own, always described
        text = action.help or ""
        if not text.strip() or "lacks type and help" in text:
            missing.append(action.option_strings[0] if action.option_strings else action.dest)
    return missing


def test_every_command_and_data_option_has_a_description():
    parser = capture_parser(lambda: VMoECLI(args=[]))
    missing = {name: _undocumented(sub) for name, sub in parser._subcommands_action.choices.items()}
    for cls in DATA_MODULES:
        data_parser = ArgumentParser()
        data_parser.add_class_arguments(cls, "data")
        missing[cls.__name__] = _undocumented(data_parser)
    assert not {name: options for name, options in missing.items() if options}, missing
    fit = parser._subcommands_action.choices["fit"]
    router = next(a for a in fit._actions if "--model.router" in a.option_strings)
    assert all(name in router.help for name in available_routers()), router.help


def test_fit_help_is_short_with_one_usage_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("usage: vmoe") and not lines[1].strip()  # one usage line, then the description
    assert len(lines) < 500, len(lines)  # 778 before: every option in the usage, whole Lightning docstrings
    assert "``" not in out and ":paramref:" not in out
    flat = " ".join(out.split())
    assert "known subclasses: CPUAccelerator, CUDAAccelerator" in flat  # class names, not class paths
    assert "Experts E per MoE block" in flat and "Routing scheme, one of" in flat


def test_short_help_keeps_leading_sentences_and_drops_markup():
    text = ("Stop training once this number of epochs is reached. Default: ``1.0``. If both :paramref:`~a.b.max` "
            "and ``max_steps`` are unset it is 1000. " + "More words here. " * 20)
    assert short_help(text) == ("Stop training once this number of epochs is reached. If both max and max_steps "
                                "are unset it is 1000. More words here.")
    assert short_help("x" * 300) == "x" * 300  # the first sentence always stays


@pytest.mark.parametrize("argv, expected", [
    (["fit", "--trainer.max_epoch", "3"], "unrecognized option --trainer.max_epoch; did you mean --trainer.max_epochs?"),
    (["fit", "--model.num_expert", "3"], "unrecognized option --model.num_expert; did you mean --model.num_experts?"),
    (["test", "--ckpt-path", "x.ckpt"], "unrecognized option --ckpt-path; did you mean --ckpt_path?"),
    (["fit", "--data.init_args.batch_sz", "3"],
     "DigitsDataModule has no argument 'batch_sz' (--data.batch_sz); did you mean --data.batch_size?"),
    (["fit", "--model.lr", "abc"], "--model.lr: Expected a <class 'float'>. Got value: abc"),
])
def test_a_mistake_is_answered_in_two_lines_with_the_closest_names(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], "--config", QUICKSTART, *argv[1:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vmoe {argv[0]}: error: {expected}", f"(vmoe {argv[0]} --help lists the options)"]


def test_a_misspelled_key_in_a_config_file_names_the_closest(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--config", str(tmp_path / "bad.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("vmoe fit: error: unknown key 'trainer.max_epoch'")
    assert err[0].endswith("did you mean trainer.max_epochs?")


def test_a_class_that_fails_to_build_is_reported_by_its_own_error(tmp_path, capsys):
    (tmp_path / "validation" / "a").mkdir(parents=True)  # no train split
    code = main(["fit", "--config", QUICKSTART, "--data", "vmoe.train.data.TimmDataModule",
                 "--data.root", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("vmoe fit: error: FileNotFoundError: train split 'train' not found: tried "), err
    assert len(err) == 2 and "Union" not in err[0]


def test_concise_error_helpers():
    nested = ('Parser key "data":\n  Does not validate against any of the Union subtypes\n  Subtypes: [A, None]\n'
              "  Errors:\n    - Problem with given class_path 'x.Y':\n        bad value 3 for z\n"
              "    - Expected a <class 'NoneType'>\n  Given value type: <class 'int'>\n  Given value: 3")
    assert innermost_line(nested) == "--data: bad value 3 for z"
    assert innermost_line("one line") == "one line"
    options = ["--trainer.max_epochs", "--trainer.min_epochs", "--model.num_experts", "--model.num_experts+"]
    assert closest("--trainer.max_epoch", options) == ["--trainer.max_epochs"]
    assert closest("--model.num_expert", options) == ["--model.num_experts"]
    assert closest("--zzz", options) == []
    assert concise_error("unrecognized arguments: --trainer.max_epoch 3 --foo", options) == (
        "unrecognized option --trainer.max_epoch; did you mean --trainer.max_epochs?; unrecognized option --foo")


def _build(args: list[str], tmp_path: Path) -> VMoECLI:
    return VMoECLI(args=[*args, "--trainer.default_root_dir", str(tmp_path)], run=False)


@pytest.mark.parametrize("router", available_routers())
def test_quickstart_config_takes_every_router(router, tmp_path):
    cli = _build(["--config", QUICKSTART, *TINY, "--model.router", router], tmp_path)
    layers = [layer for _, layer in iter_moe_mlps(cli.model.model)]
    assert len(layers) == 1 and cli.model.hparams.router == router  # depth 2, every-2: block 1
    assert cli.model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", VMOE_CONFIGS)
def test_vmoe_configs_leave_routing_defaults_to_the_router(name):
    model = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]
    assert model["router"] == "vmoe" and not {"k", "capacity_factor", "noise_std"} & set(model), model


@pytest.mark.parametrize("router", ["switch", "soft", "expert_choice"])
def test_fashion_mnist_config_takes_other_routers(router, tmp_path):
    config = str(ROOT / "configs" / "fashion_mnist_vmoe.yaml")
    cli = _build(["--config", config, *TINY, "--model.router", router], tmp_path)
    assert cli.model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def _callback_types(cli: VMoECLI) -> set[str]:
    return {type(c).__name__ for c in cli.trainer.callbacks}


def test_callbacks_file_adds_to_the_config_callbacks(tmp_path):
    pictures = str(ROOT / "configs" / "callbacks" / "routing_pictures.yaml")
    cli = _build(["--config", QUICKSTART, *TINY, "--trainer.callbacks+", pictures], tmp_path)
    assert {"LearningRateMonitor", "RoutingPictures"} <= _callback_types(cli)


def test_a_layered_config_that_replaces_callbacks_says_what_it_drops(tmp_path):
    layered = tmp_path / "pictures.yaml"
    layered.write_text(yaml.safe_dump({"trainer": {"callbacks": yaml.safe_load(
        (ROOT / "configs" / "callbacks" / "routing_pictures.yaml").read_text())}}))
    with pytest.warns(UserWarning, match=f"{layered} replaces the trainer.callbacks of .*quickstart.yaml, dropping "
                                         "LearningRateMonitor: .*--trainer.callbacks\\+ FILE"):
        cli = _build(["--config", QUICKSTART, "--config", str(layered), *TINY], tmp_path)
    assert "LearningRateMonitor" not in _callback_types(cli) and "RoutingPictures" in _callback_types(cli)
    # recipe.yaml repeats the learning-rate monitor, so layering it drops nothing
    assert dropped_callbacks(["--config", QUICKSTART, "--config", str(ROOT / "configs" / "recipe.yaml")]) == []


def test_evaluation_commands_leave_the_run_layout_alone(tmp_path, capsys):
    root = tmp_path / "run"
    fit = ["fit", "--config", QUICKSTART, *TINY, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2"]
    assert main(fit) == 0
    run0 = root / "lightning_logs" / "version_0"
    last = run0 / "checkpoints" / "last.ckpt"
    for command in ("validate", "test", "predict"):
        assert main([command, "--config", QUICKSTART, *TINY, "--trainer.default_root_dir", str(root),
                     "--ckpt_path", str(last), f"--trainer.limit_{'val' if command == 'validate' else command}_batches",
                     "1"]) == 0
        assert f"logs: {run0 / 'eval' / f'{command}-last' / 'version_0'}" in capsys.readouterr().out
    assert main(fit) == 0  # the next fit: version_1, whatever was evaluated in between
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    evals = run0 / "eval"
    assert sorted(p.name for p in evals.iterdir()) == ["predict-last", "test-last", "validate-last"]
    assert (evals / "test-last" / "version_0" / "metrics.csv").is_file()
    assert (evals / "predict-last" / "version_0" / "predictions.csv").is_file()
    assert not (run0 / "eval" / "test-last" / "version_0" / "checkpoints").exists()
