"""MoEConfig and RoutingSettings: every bad setting fails where it is read, naming itself and its valid range."""
import math
from pathlib import Path

import pytest
import torch

from vmoe.models import create_vmoe, routing_settings, set_routing
from vmoe.moe import MoEConfig, RoutingSettings, iter_moe_mlps
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
        MoEConfig.from_flat(**kwargs)


def test_defaults_leave_unset_settings_to_the_scheme():
    config = MoEConfig()
    assert (config.moe_layers, config.num_experts, config.router) == ("every-2", 8, "vmoe")
    assert config.settings == RoutingSettings() and config.settings.set_fields() == []
    config = MoEConfig.from_flat(k=1, capacity_factor=2.0, batch_priority=True, moe_kwargs={"importance_weight": 0.0})
    assert config.settings == RoutingSettings(k=1, capacity_factor=2.0, batch_priority=True)
    assert config.moe_kwargs == {"importance_weight": 0.0}
    assert MoEConfig.from_flat(**config.flat()) == config
    assert MoEConfig(num_experts=[2, 4]).experts_per_layer(2) == [2, 4]
    with pytest.raises(ValueError, match="one count per MoE block"):
        MoEConfig(num_experts=[2, 4]).experts_per_layer(3)
    with pytest.raises(ValueError, match=r"unknown MoE settings \['capcity_factor'\]"):
        MoEConfig.from_flat(capcity_factor=2.0)
    with pytest.raises(ValueError, match=r"moe_kwargs repeats .*\['bfloat16_dispatch'\]"):
        MoEConfig.from_flat(moe_kwargs={"bfloat16_dispatch": True})


def test_split_takes_the_moe_settings_over_defaults():
    config, rest = MoEConfig.split({"k": 1, "img_size": 32}, defaults={"moe_layers": "last-2", "k": 2})
    assert (config.moe_layers, config.settings.k, rest) == ("last-2", 1, {"img_size": 32})


def test_create_vmoe_checks_before_building_and_accepts_a_config():
    with pytest.raises(ValueError, match="capacity_factor must be > 0 .*got inf"):
        create_vmoe("vit_small_patch16_224", capacity_factor=INF, **TINY)
    model = create_vmoe("vit_small_patch16_224", MoEConfig.from_flat(num_experts=4, k=1), capacity_factor=2.0, **TINY)
    layers = [layer for _, layer in iter_moe_mlps(model)]
    assert [(layer.num_experts, layer.k, layer.settings.capacity_factor) for layer in layers] == [(4, 1, 2.0)]
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
        RoutingSettings(capacity_factor=1.0, eval_capacity_factor=NAN)
    settings = RoutingSettings(capacity_factor=1.05).replace(batch_priority=True)
    assert settings == RoutingSettings(capacity_factor=1.05, batch_priority=True)
    with pytest.raises(ValueError, match=r"unknown routing setting\(s\) \['capcity_factor'\]; valid: \['k', "):
        settings.replace(capcity_factor=2.0)
    with pytest.raises(ValueError, match="bfloat16_dispatch must be True or False"):
        settings.replace(bfloat16_dispatch="false")


def test_block_resolves_the_scheme_defaults_once():
    from vmoe.moe import MoEMlp, V_MOE_CAPACITY_FACTOR
    layer = MoEMlp(8, 16, num_experts=4)
    # an unset eval factor is the training factor, resolved when the block is built
    assert layer.settings == RoutingSettings(k=2, capacity_factor=V_MOE_CAPACITY_FACTOR,
                                             eval_capacity_factor=V_MOE_CAPACITY_FACTOR, noise_std=1.0)
    layer = MoEMlp(8, 16, num_experts=4, router="switch")
    assert (layer.settings.k, layer.settings.noise_std) == (1, None)
    with pytest.raises(ValueError, match=r"given both in settings= and as keywords"):
        MoEMlp(8, 16, num_experts=4, settings=RoutingSettings(k=1), capacity_factor=2.0)


def test_set_routing_checks_before_changing_any_layer():
    model = create_vmoe("vit_small_patch16_224", num_experts=4, moe_layers=[0, 1], **TINY)
    layers = [layer for _, layer in iter_moe_mlps(model)]
    before = layers[0].settings
    assert before == RoutingSettings(k=2, capacity_factor=1.05, eval_capacity_factor=1.05, noise_std=1.0)
    with pytest.raises(ValueError, match="capacity_factor must be > 0 or None .*got inf"):
        set_routing(model, capacity_factor=INF)
    # k=3 fits E=4 but k=5 does not: no layer changes when one would be refused
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\], got 5"):
        set_routing(model, k=5)
    assert all(layer.settings == before for layer in layers)
    with routing_settings(model, capacity_factor=2.0, eval_capacity_factor=0.5, batch_priority=True):
        assert all(layer.settings == before.replace(capacity_factor=2.0, eval_capacity_factor=0.5,
                                                    batch_priority=True) for layer in layers)
        assert layers[0].capacity(10, training=False) == math.ceil(10 * 2 * 0.5 / 4 / 4) * 4
    assert all(layer.settings == before for layer in layers)
    assert set_routing(model, capacity_factor=3.0) == 2
    # the eval factor was resolved when the block was built: changing the training factor leaves it
    assert layers[0].settings.eval_capacity_factor == 1.05 and torch.is_tensor(layers[0].aux_loss)
