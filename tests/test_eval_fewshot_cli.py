"""`vmoe fewshot` end to end on a tiny checkpoint: the reference protocol's numbers recomputed from the features,
the held-out option with several seeds, bad options, and a one-class dataset refused (as the user runs it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vmoe.eval import REFERENCE_L2_GRID, linear_probe_accuracies, mean_rank_choice, shot_draw
from vmoe.eval.features import extract_features, split_for_features
from vmoe.eval.protocol import shot_seeds
from vmoe.cli import main
from vmoe.train.data import DigitsDataModule
from vmoe.train.from_checkpoint import load_classifier

from test_viz_cli import write_run as _write_run

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1, num_experts=4,
             model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2), moe_layers="every-2")
DIGITS = {"class_path": "vmoe.train.data.DigitsDataModule", "init_args": {"img_size": 8}}


def write_run(run: Path, model: dict, data: dict) -> Path:
    """<run>/checkpoints/last.ckpt next to <run>/config.yaml, as `vmoe fit` leaves them (no trainer section)."""
    return _write_run(run, model, data, trainer=None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"), MODEL, DIGITS)


def test_reference_protocol_end_to_end(ckpt, tmp_path, capsys):
    out = tmp_path / "f.json"
    main(["fewshot", "--ckpt_path", str(ckpt), "--shots", "1,5", "--max_test", "120", "--out", str(out),
          "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "1-shot  " in printed and "5-shot  " in printed and "best mean rank of test accuracy" in printed
    result = json.loads(out.read_text())
    assert result["l2_selection"] == "mean_rank" and result["l2_grid"] == list(REFERENCE_L2_GRID)
    assert result["shot_seeds"] == [397586535]
    # recompute from the network's features: the reference's draw, probe and choice. (Routing capacity makes a
    # V-MoE's features depend on the batch, so the images go through in the CLI's batches: drawn ones sorted.)
    dm = DigitsDataModule(img_size=8)
    dm.setup()
    net = load_classifier(ckpt, "cpu").model
    draw = shot_draw(dm.train_set.labels, 10, 5, shot_seeds(0, 1)[0])
    images = draw.flatten().sort().values
    pool_x, _ = extract_features(net, split_for_features(dm, "train"), images)
    test_x, test_y = extract_features(net, dm.test_set, range(120))
    for row, n in zip(result["rows"], (1, 5)):
        idx = torch.searchsorted(images, draw[:, :n].flatten().contiguous())
        accs = linear_probe_accuracies(pool_x[idx], dm.train_set.labels[draw[:, :n].flatten()], test_x, test_y,
                                       REFERENCE_L2_GRID, 10)
        best = mean_rank_choice([accs])
        assert row["shots"] == n and row["l2"] == REFERENCE_L2_GRID[best]
        assert row["accuracy"] == accs[best] and row["accuracy_by_l2"] == accs
        assert row["num_test"] == 120 and row["selection"] == "mean_rank"


def test_heldout_selection_and_several_seeds(ckpt, tmp_path, capsys):
    out = tmp_path / "h.json"
    rows = main(["fewshot", "--ckpt_path", str(ckpt), "--shots", "[2]", "--l2_selection", "heldout",
                 "--holdout_per_class", "3", "--num_seeds", "2", "--max_test", "50", "--l2_grid", "0.1,10,1000",
                 "--out", str(out), "--device", "cpu"])
    assert rows in (0, None)
    printed = capsys.readouterr().out
    assert "held-out acc" in printed and "3 held-out train images per class" in printed
    (row,) = json.loads(out.read_text())["rows"]
    assert row["num_seeds"] == 2 and len(row["seed_accuracies"]) == 2 and row["num_holdout"] == 30
    assert row["l2"] in (0.1, 10.0, 1000.0)
    assert row["accuracy"] == pytest.approx(sum(row["seed_accuracies"]) / 2)


@pytest.mark.parametrize("flags, message", [
    (["--holdout_per_class", "5"], "holdout_per_class=5 applies to l2_selection='heldout' only"),
    (["--l2_selection", "test_labels"], "--l2_selection must be one of mean_rank, heldout"),
    (["--num_seeds", "0"], "num_seeds must be an integer >= 1"),
    (["--l2_grid", "1,-1"], "--l2_grid must be a non-empty list of finite values > 0"),
    (["--shots", "500"], "500 images of every class are needed"),
])
def test_bad_options_are_refused_by_name(ckpt, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fewshot", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "x.json"), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_one_class_dataset_is_refused(tmp_path):
    # an image folder with a single class: before, `vmoe fewshot` printed `1-shot  1.000` and exited 0
    for split in ("train", "val"):
        folder = tmp_path / split / "only"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    data = {"class_path": "vmoe.train.data.ImageFolderDataModule",
            "init_args": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"), "img_size": 8,
                          "num_workers": 0}}
    ck = write_run(tmp_path / "run", dict(MODEL, in_chans=3, num_classes=2), data)
    out = tmp_path / "run" / "fewshot.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "vmoe", "fewshot", "--ckpt_path", str(ck), "--shots", "1",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ImageFolderDataModule: few-shot evaluation needs at least 2 classes, got num_classes=1" in proc.stderr
    assert "1-shot" not in proc.stdout and not out.exists()
