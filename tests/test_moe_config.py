"""MoEConfig and RoutingSettings: every bad setting fails where it is read, naming itself and its valid range."""
import math
from pathlib import Path

import pytest
import torch

from vmoe.models import create_vmoe, routing_settings, set_routing
from vmoe.moe import MoEConfig, RoutingSettings, iter_moe_layers
from vmoe.train.cli import main
from vmoe.train.module import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kwargs, message", [
    ({"capacity_factor": INF}, r"capacity_factor must be > 0 or None \(the scheme's default\), got inf; valid: a finite"),
    ({"capacity_factor": NAN}, "capacity_factor must be > 0 .*got nan"),
    ({"capacity_factor": 0.0}, "capacity_factor must be > 0 .*got 0.0"),
    ({"eval_capacity_factor": INF}, r"eval_capacity_factor must be > 0 or None \(= capacity_factor\), got inf"),
    ({"eval_capacity_factor": -INF}, "eval_capacity_factor must be > 0 .*got -inf"),
    ({"eval_capacity_factor": NAN}, "eval_capacity_factor must be > 0 .*got nan"),
    ({"noise_std": NAN}, "noise_std must be >= 0, got nan; valid: a finite number >= 0"),
    ({"noise_std": INF}, "noise_std must be >= 0, got inf"),
    ({"noise_std": -1.0}, "noise_std must be >= 0, got -1.0"),
    ({"num_experts": 2.5}, "num_experts must be an integer >= 1, got 2.5"),
    ({"num_experts": [4, 2.5]}, "num_experts must be an integer >= 1, got 2.5"),
    ({"num_experts": []}, "num_experts must be an integer >= 1 or a non-empty list"),
    ({"num_experts": 0}, "num_experts must be an integer >= 1, got 0"),
    ({"k": 1.5}, r"k must be an integer >= 1 or None \(the scheme's default\), got 1.5"),
    ({"k": True}, "k must be an integer >= 1 .*got True"),
    ({"group_size": 2.5}, r"group_size must be an integer >= 1 or None \(the whole local batch\), got 2.5"),
    ({"group_size": 0}, "group_size must be an integer >= 1 .*got 0"),
    ({"batch_priority": "yes"}, "batch_priority must be True or False, got 'yes'"),
    ({"moe_kwargs": {"k": 2}}, r"moe_kwargs repeats arguments set elsewhere: \['k'\]"),
])
def test_bad_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_defaults_and_block_kwargs_leave_unset_settings_out():
    config = MoEConfig()
    assert (config.moe_layers, config.num_experts, config.router) == ("every-2", 8, "vmoe")
    unset = dict(k=None, capacity_factor=None, eval_capacity_factor=None, batch_priority=False, noise_std=None,
                 group_size=None)
    assert config.block_kwargs(4) == {"router": "vmoe", "num_experts": 4, **unset}
    config = MoEConfig(k=1, capacity_factor=2.0, batch_priority=True, moe_kwargs={"importance_weight": 0.0})
    assert config.block_kwargs(3) == {"router": "vmoe", "num_experts": 3, **unset, "k": 1, "capacity_factor": 2.0,
                                      "batch_priority": True, "importance_weight": 0.0}
    assert MoEConfig(num_experts=[2, 4]).experts_per_layer(2) == [2, 4]
    with pytest.raises(ValueError, match="one count per MoE block"):
        MoEConfig(num_experts=[2, 4]).experts_per_layer(3)


def test_split_takes_the_moe_settings_over_defaults():
    config, rest = MoEConfig.split({"k": 1, "img_size": 32}, defaults={"moe_layers": "last-2", "k": 2})
    assert (config.moe_layers, config.k, rest) == ("last-2", 1, {"img_size": 32})


def test_create_vmoe_checks_before_building_and_accepts_a_config():
    with pytest.raises(ValueError, match="capacity_factor must be > 0 .*got inf"):
        create_vmoe("vit_small_patch16_224", capacity_factor=INF, **TINY)
    model = create_vmoe("vit_small_patch16_224", MoEConfig(num_experts=4, k=1), capacity_factor=2.0, **TINY)
    layers = [layer for _, layer in iter_moe_layers(model)]
    assert [(layer.num_experts, layer.k, layer.capacity_factor) for layer in layers] == [(4, 1, 2.0)]
    with pytest.raises(TypeError, match=r"unknown MoE settings \['capcity_factor'\]"):
        from vmoe.models import convert_to_moe
        convert_to_moe(model, capcity_factor=2.0)


def test_image_classifier_checks_the_settings():
    arch = dict(num_classes=5, img_size=16, model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(ValueError, match="eval_capacity_factor must be > 0 .*got inf"):
        ImageClassifier(**arch, eval_capacity_factor=INF)
    with pytest.raises(ValueError, match="group_size must be an integer >= 1 .*got 2.5"):
        ImageClassifier(**arch, group_size=2.5)


def test_inf_in_yaml_through_the_cli_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("VMOE_DEBUG", "1")  # the CLI raises instead of printing a one-line error
    argv = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.init_args.img_size", "8",
            "--model.model_kwargs", '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}',
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
            "--model.capacity_factor", ".inf"]
    with pytest.raises(ValueError, match="capacity_factor must be > 0 .*got inf"):
        main(argv)


def test_routing_settings_validate_and_replace():
    with pytest.raises(ValueError, match="eval_capacity_factor must be > 0 .*got nan"):
        RoutingSettings(1.0, NAN)
    settings = RoutingSettings(1.05).replace(batch_priority=True)
    assert settings == RoutingSettings(1.05, None, True)


def test_set_routing_checks_before_changing_any_layer():
    model = create_vmoe("vit_small_patch16_224", num_experts=4, moe_layers=[0, 1], **TINY)
    layers = [layer for _, layer in iter_moe_layers(model)]
    with pytest.raises(ValueError, match="capacity_factor must be > 0, got inf"):
        set_routing(model, capacity_factor=INF)
    assert all(layer.routing == RoutingSettings(1.05, None, False) for layer in layers)
    with routing_settings(model, capacity_factor=2.0, eval_capacity_factor=0.5, batch_priority=True):
        assert all(layer.routing == RoutingSettings(2.0, 0.5, True) for layer in layers)
        assert layers[0].capacity(10, training=False) == math.ceil(10 * 2 * 0.5 / 4 / 4) * 4
    # the eval factor follows the training one again (None), as before the block
    assert all(layer.routing == RoutingSettings(1.05, None, False) for layer in layers)
    layers[0].capacity_factor = 3.0
    assert layers[0].eval_capacity_factor == 3.0 and torch.is_tensor(layers[0].aux_loss)
