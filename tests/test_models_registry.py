"""The vmoe_timm_* names (timm-shaped V-MoEs for upcycling): build, forward, real configs, pretrained loading
that upcycles dense weights."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import vmoe  # noqa: F401  (registers the names)
from vmoe.models import TIMM_NAMES, UPCYCLE_FROM, moe_block_indices

NAMES = ["vmoe_timm_ti16_e8_every2", "vmoe_timm_s16_e8_every2", "vmoe_timm_s32_e8_last2", "vmoe_timm_b16_e8_every2",
         "vmoe_timm_b32_e8_last2", "vmoe_timm_l16_e8_every2"]
SMALL = dict(embed_dim=32, num_heads=2)  # keeps depth, patch size and placement of the real config


def test_names_are_registered_with_dense_pretrained_cfg():
    assert sorted(timm.list_models("vmoe_timm_*")) == sorted(NAMES)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == f"timm/{UPCYCLE_FROM[name]}" and cfg.architecture == name
        assert UPCYCLE_FROM[name].startswith("vit_") and cfg.notes == (f"upcycle_from={UPCYCLE_FROM[name]}",)
    assert timm.models.get_pretrained_cfg("vmoe_timm_s16_e8_every2").hf_hub_id == \
        "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"


@pytest.mark.parametrize("name", NAMES)
def test_each_name_builds_and_runs_forward_at_small_img_size(name):
    vit_args = TIMM_NAMES[name].vit
    patch = vit_args["patch_size"]
    # narrow for speed; the real widths are built (on meta) by the next test
    model = timm.create_model(name, pretrained=False, img_size=2 * patch, num_classes=10, **SMALL).eval()
    depth = vit_args["depth"]
    expected = list(range(1, depth, 2)) if name.endswith("every2") else [depth - 3, depth - 1]
    assert moe_block_indices(model) == expected
    assert all(model.blocks[i].mlp.num_experts == 8 and model.blocks[i].mlp.k == 2 for i in expected)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 2 * patch, 2 * patch))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_real_configs_build_on_meta_with_expected_parameter_count(name):
    vit_args, dense_name = TIMM_NAMES[name].vit, UPCYCLE_FROM[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        dense = timm.create_model(dense_name.split(".")[0])
    d, depth = vit_args["embed_dim"], vit_args["depth"]
    h = 4 * d
    layers = len(range(1, depth, 2)) if name.endswith("every2") else 2
    # each MoE layer: 7 more copies of the MLP (fc1 w+b, fc2 w+b) and an [8, D] router
    extra = layers * (7 * (2 * d * h + h + d) + 8 * d)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters()) + extra
    assert model.blocks[depth - 1].mlp.experts.fc1_weight.shape == (8, h, d)


def _dense_file(tmp_path, suffix):
    torch.manual_seed(3)
    dense = timm.create_model("vit_small_patch16_224", img_size=16, patch_size=4, depth=4, **SMALL)
    path = tmp_path / f"dense{suffix}"
    save_file(dense.state_dict(), str(path)) if suffix == ".safetensors" else torch.save(dense.state_dict(), path)
    return dense, path


def _check_experts_copy_dense(model, dense):
    for i in moe_block_indices(model):
        for e in range(8):
            assert torch.equal(model.blocks[i].mlp.experts.fc1_weight[e], dense.blocks[i].mlp.fc1.weight)
            assert torch.equal(model.blocks[i].mlp.experts.fc2_bias[e], dense.blocks[i].mlp.fc2.bias)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc1.weight)


def test_pretrained_from_local_file_upcycles_through_timm_loading(tmp_path):
    dense, path = _dense_file(tmp_path, ".safetensors")
    model = timm.create_model("vmoe_timm_s16_e8_every2", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              img_size=16, patch_size=4, depth=4, num_classes=10, in_chans=1, **SMALL)
    _check_experts_copy_dense(model, dense)
    assert torch.equal(model.pos_embed, dense.pos_embed)
    assert model.head.weight.shape == (10, 32)  # reset: 1000 pretrained classes vs 10
    # timm's single-channel adaptation of the patch embedding: the sum over RGB
    assert torch.allclose(model.patch_embed.proj.weight, dense.patch_embed.proj.weight.sum(1, keepdim=True))
    assert model.pretrained_cfg["architecture"] == "vmoe_timm_s16_e8_every2"


def test_pretrained_from_hub_fetches_the_dense_weights(tmp_path, monkeypatch):
    dense, _ = _dense_file(tmp_path, ".pth")
    fetched = []

    def fake_hub(hub_id, *args, **kwargs):
        fetched.append(hub_id)
        return {k: v.clone() for k, v in dense.state_dict().items()}

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", fake_hub)
    model = timm.create_model("vmoe_timm_s16_e8_every2", pretrained=True, img_size=16, patch_size=4, depth=4,
                              router_init_std=0.0, **SMALL)
    assert fetched == ["timm/vit_small_patch16_224.augreg_in21k_ft_in1k"]
    _check_experts_copy_dense(model, dense)
    assert torch.equal(model.head.weight, dense.head.weight)  # same 1000 classes: the head is kept
    assert torch.count_nonzero(model.blocks[1].mlp.router.weight) == 0
