"""`vmoe visualize` / `vmoe sweep` on a tiny checkpoint, and the RoutingPictures callback in a real fit."""
import json
import os

import lightning
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vmoe.cli import main, run
from vmoe.train.data import DigitsDataModule
from vmoe.train.module import ImageClassifier
from vmoe.viz.callback import RoutingPictures
from vmoe.viz.cli import sweep

MODEL = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, num_experts=4,
             model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2), moe_layers="every-2")
DATA = {"class_path": "vmoe.train.data.DigitsDataModule", "init_args": {"img_size": 16, "batch_size": 32}}


def write_run(run, model: dict, data: dict = DATA, trainer: dict | None = {"max_epochs": 1}):
    """A LightningCLI-style run dir: <run>/checkpoints/last.ckpt next to <run>/config.yaml."""
    torch.manual_seed(0)
    module = ImageClassifier(**model)
    os.makedirs(run / "checkpoints")
    path = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump({"model": model, "data": data, **({"trainer": trainer} if trainer else {})}, f)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"), MODEL)


def test_visualize_writes_every_picture(ckpt, tmp_path, capsys):
    assert main(["visualize", "--ckpt_path", str(ckpt), "--out", str(tmp_path), "--num_images", "3",
                 "--capacity_factors", "0.25,1.0", "--max_batches", "2"]) in (0, None)  # exit status 0
    names = {"dropped_patches_cf0.25", "dropped_patches_cf1", "expert_map_block1", "expert_load",
             "class_expert_block1"}
    assert {p.stem for p in tmp_path.glob("*.png")} == names
    for name in names:
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "DigitsDataModule (from" in capsys.readouterr().out  # found config.yaml next to checkpoints/


def test_sweep_prints_table_and_saves(ckpt, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"data": DATA, "seed_everything": 0}))
    rows = sweep(["--ckpt_path", str(ckpt), "--config", str(cfg), "--out", str(tmp_path / "s"),
                 "--capacity_factors", "[0.1, 2.0]", "--max_batches", "1", "--data.init_args.eval_batch_size", "16"])
    out = capsys.readouterr().out
    assert [(r["capacity_factor"], r["mode"]) for r in rows] == [(0.1, "vanilla"), (0.1, "bpr"), (2.0, "vanilla"),
                                                                (2.0, "bpr")]
    assert all(r["num_images"] == 16 for r in rows)  # --data override applied on top of --config
    assert rows[0]["dropped_tokens"] > rows[2]["dropped_tokens"] == 0.0
    assert "BPR acc" in out and "batches of 16" in out
    assert json.loads((tmp_path / "s" / "capacity_sweep.json").read_text()) == rows
    assert (tmp_path / "s" / "capacity_sweep.png").stat().st_size > 1000


def test_cli_errors_are_clear(ckpt, tmp_path):
    with pytest.raises(SystemExit):  # jsonargparse reports the bad value and exits
        main(["sweep", "--ckpt_path", str(ckpt), "--out", str(tmp_path), "--split", "train"])
    with pytest.raises(ValueError, match="no such file"):
        run(["sweep", "--ckpt_path", str(ckpt), "--out", str(tmp_path), "--config", str(tmp_path / "none.yaml")])
    with pytest.raises(ValueError, match="32px images"):
        run(["visualize", "--ckpt_path", str(ckpt), "--out", str(tmp_path), "--data.init_args.img_size", "32"])


def test_callback_logs_to_csv_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    dm = DigitsDataModule(img_size=16, batch_size=32)
    module = ImageClassifier(**MODEL)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = lightning.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=2, logger=loggers,
                                callbacks=[RoutingPictures(num_images=2, capacity_factors=[0.5])],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    pngs = sorted(os.listdir(tmp_path / "csv" / "version_0" / "routing" / "epoch=0"))
    assert pngs == ["class_expert_block1.png", "dropped_patches_cf0.5.png", "expert_load.png",
                    "expert_map_block1.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    assert "routing/dropped_patches_cf0.5" in events.Tags()["images"]
    with pytest.raises(ValueError, match="every_n_epochs"):
        RoutingPictures(every_n_epochs=0)


@pytest.mark.parametrize("command", ["visualize", "sweep", "fewshot"])
def test_a_missing_or_damaged_checkpoint_is_named(tmp_path, capsys, command):
    missing = tmp_path / "gone" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--ckpt_path", str(missing), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--ckpt_path {missing}: no such checkpoint file" in err and "datamodule" not in err
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit):
        main([command, "--ckpt_path", str(empty), "--out", str(tmp_path)])
    assert f"{empty} (0 bytes): the file is empty" in capsys.readouterr().err
    weights = tmp_path / "w.safetensors"
    with pytest.raises(SystemExit):
        main([command, "--ckpt_path", str(weights), "--out", str(tmp_path)])
    assert "pass --model.checkpoint_path instead" in capsys.readouterr().err


def test_options_are_not_abbreviated(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["visualize", "--ckpt_path", str(ckpt), "--out", str(tmp_path), "--num_image", "3"])
    assert "--num_image" in capsys.readouterr().err


SOFT = dict(MODEL, router="soft")


@pytest.fixture(scope="module")
def soft_ckpt(tmp_path_factory):
    """The ckpt fixture's run dir for a Soft MoE model (block 1)."""
    return write_run(tmp_path_factory.mktemp("soft_run"), SOFT)


def test_visualize_soft_moe_draws_what_applies(soft_ckpt, tmp_path, capsys):
    assert main(["visualize", "--ckpt_path", str(soft_ckpt), "--out", str(tmp_path), "--num_images", "3",
                 "--max_batches", "2"]) in (0, None)
    assert {p.stem for p in tmp_path.glob("*.png")} == {"expert_map_block1", "expert_load", "class_expert_block1"}
    out = capsys.readouterr().out
    assert ("no dropped-patch pictures: MoE block [1] (SoftMoEMlp) has no capacity: Soft MoE mixes tokens into "
            "slots and drops nothing\n") in out
    with pytest.raises(ValueError, match=r"^--capacity_factors: MoE block \[1\] \(SoftMoEMlp\) has no capacity: "
                                         r"Soft MoE mixes tokens into slots and drops nothing; .*leave out"):
        run(["visualize", "--ckpt_path", str(soft_ckpt), "--out", str(tmp_path / "cf"), "--capacity_factors", "0.5"])
    assert not (tmp_path / "cf").exists()


def test_sweep_refuses_soft_moe(soft_ckpt, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^no capacity to sweep: MoE block \[1\] \(SoftMoEMlp\) has no capacity"):
        run(["sweep", "--ckpt_path", str(soft_ckpt), "--out", str(tmp_path / "s")])
    assert main(["sweep", "--ckpt_path", str(soft_ckpt), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmoe sweep: error: no capacity to sweep") and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_callback_on_soft_moe_training(tmp_path, caplog):
    torch.manual_seed(0)
    dm = DigitsDataModule(img_size=16, batch_size=32)

    def fit(callback, name):
        trainer = lightning.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=2,
                                    logger=CSVLogger(tmp_path, name=name), callbacks=[callback],
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(ImageClassifier(**SOFT), datamodule=dm)

    with caplog.at_level("INFO"):
        fit(RoutingPictures(num_images=2), "soft")
    assert "RoutingPictures: no dropped-patch pictures: MoE block [1] (SoftMoEMlp) has no capacity" in caplog.text
    pngs = sorted(os.listdir(tmp_path / "soft" / "version_0" / "routing" / "epoch=0"))
    assert pngs == ["class_expert_block1.png", "expert_load.png", "expert_map_block1.png"]
    with pytest.raises(ValueError, match=r"RoutingPictures\(capacity_factors=\[0.5\]\): MoE block \[1\] "
                                         r"\(SoftMoEMlp\) has no capacity"):
        fit(RoutingPictures(num_images=2, capacity_factors=[0.5]), "soft_cf")
