"""The training recipe options end to end: Mixup/CutMix soft targets, EMA evaluated and checkpointed,
learning-rate logging, the few-shot callback; `vmoe fit` names its checkpoints; `vmoe fewshot`; flops --config."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vmoe.train import ImageClassifier
from vmoe.cli import main
from vmoe.train.mixup import build_mixup, mix_batch, soft_target_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART, RECIPE = str(ROOT / "configs" / "quickstart.yaml"), str(ROOT / "configs" / "recipe.yaml")
TINY = ["--config", QUICKSTART, "--data.init_args.img_size", "8", "--data.init_args.batch_size", "64",
        "--model.model_kwargs", '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}',
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu"]


def _metrics(log_dir: Path) -> list[dict]:
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(open(log_dir / "metrics.csv"))]


def test_soft_target_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, float(np.log(3.0))]])  # softmax rows: (1/2, 1/2) and (1/4, 3/4)
    targets = torch.tensor([[0.3, 0.7], [0.0, 1.0]])
    expected = (np.log(2.0) + -np.log(0.75)) / 2
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected)


def test_mixup_targets_and_errors():
    assert build_mixup(4, label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0,
                       switch_prob=0.5, mode="batch") is None
    mixup = build_mixup(4, label_smoothing=0.2, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0,
                        switch_prob=0.5, mode="batch")
    np.random.seed(0)
    x, y = torch.ones(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    x[2:] = 0.0
    mixed, soft = mix_batch(mixup, x.clone(), y)
    lam = float(mixed[0].mean())  # image 0 (ones) mixed with the flipped batch's image 0 = image 3 (zeros)
    # label smoothing 0.2 over 4 classes: 0.85 on the label, 0.05 elsewhere, then lam-mixed with the partner's
    assert soft[0, 0].item() == pytest.approx(lam * 0.85 + (1 - lam) * 0.05)
    assert soft[0, 3].item() == pytest.approx(lam * 0.05 + (1 - lam) * 0.85)
    assert torch.allclose(soft.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="must be even"):
        mix_batch(mixup, torch.ones(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="mixup_mode"):
        ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=4, img_size=8, in_chans=1, moe_layers=None,
                        model_kwargs=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2), mixup_alpha=1.0,
                        mixup_mode="row")


def test_mixup_training_step_uses_soft_targets():
    m = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=4, img_size=8, in_chans=1, moe_layers=None,
                        model_kwargs=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2), mixup_alpha=1.0)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    np.random.seed(1)
    loss = m._shared_step((x.clone(), y), "train")
    np.random.seed(1)
    mixed, soft = m.mixup(x.clone(), y)
    assert not torch.equal(mixed, x)  # blended with the flipped batch
    assert loss.item() == pytest.approx(soft_target_cross_entropy(m(mixed).float(), soft).item(), rel=1e-6)


def test_recipe_fit_logs_lr_fewshot_and_checkpoints_ema_weights(tmp_path, capsys):
    root = tmp_path / "run"
    main(["fit", *TINY, "--config", RECIPE, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2",
          "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
          "--data.init_args.auto_augment", "rand-m5-n1", "--trainer.log_every_n_steps", "1"])
    out = capsys.readouterr().out
    log_dir = root / "lightning_logs" / "version_0"
    last = log_dir / "checkpoints" / "last.ckpt"
    assert f"last: {last}" in out and f"checkpoints: {log_dir / 'checkpoints'}" in out  # fit says where
    assert "1-shot  " in out and "10-shot  " in out  # the few-shot callback's table
    rows = _metrics(log_dir)
    assert any(k.startswith("lr-AdamW") for r in rows for k in r)  # LearningRateMonitor
    fewshot = [r for r in rows if "fewshot/10shot" in r]
    assert len(fewshot) == 2 and all(0 <= r["fewshot/10shot"] <= 1 for r in fewshot)
    ckpt = torch.load(last, weights_only=False, map_location="cpu")
    # EMA: state_dict holds the averaged weights, current_model_state the raw ones
    assert "current_model_state" in ckpt
    key = "model.head.weight"
    assert not torch.equal(ckpt["state_dict"][key], ckpt["current_model_state"][key])
    # validation ran on the EMA weights: re-validating the checkpoint's state_dict gives the logged val/loss
    val_fit = [r["val/loss"] for r in rows if "val/loss" in r][-1]
    main(["validate", *TINY, "--config", RECIPE, "--trainer.default_root_dir", str(root), "--ckpt_path", str(last),
          "--trainer.limit_val_batches", "2"])
    val_again = [r["val/loss"] for r in _metrics(log_dir / "eval" / "validate-last" / "version_0") if "val/loss" in r][-1]
    assert val_again == pytest.approx(val_fit, rel=1e-5)

    # vmoe fewshot on the same checkpoint (config.yaml found next to checkpoints/)
    capsys.readouterr()
    main(["fewshot", "--ckpt_path", str(last), "--shots", "1,5", "--l2_selection", "heldout", "--holdout_per_class", "5",
          "--max_test", "100"])
    out = capsys.readouterr().out
    assert "1-shot  " in out and "5-shot  " in out
    result = json.loads((log_dir / "fewshot.json").read_text())
    assert [r["shots"] for r in result["rows"]] == [1, 5] and result["rows"][0]["num_test"] == 100


def test_flops_takes_a_training_config(capsys):
    main(["flops", "--config", QUICKSTART])
    out = capsys.readouterr().out
    assert "at 16px, 1 channel(s), 10 classes" in out and "V-MoE E8 K2 every-2" in out
    with pytest.raises(SystemExit, match="only"):
        main(["flops", "--config", QUICKSTART, "--k", "1"])


def test_warns_when_data_normalisation_differs_from_the_pretrained_weights():
    import types
    import warnings

    from vmoe.train.mixup import warn_if_normalisation_differs

    m = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=4, img_size=8, in_chans=3, moe_layers=None,
                        model_kwargs=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2))
    m.hparams.pretrained = True  # as if timm's augreg weights (mean/std 0.5) had been loaded
    assert m.model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    for mean, expect_warning in (((0.485, 0.456, 0.406), True), ((0.5, 0.5, 0.5), False)):
        m._trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(mean=mean, std=(0.5, 0.5, 0.5)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_normalisation_differs(m)
        assert any("pretrained weights expect" in str(w.message) for w in caught) == expect_warning
