"""What timm's vendored model tests (tests/timm_models) do not cover: every registered name at its full
size (on the meta device: no memory, no compute), TorchScript's refusal, and torch.fx's leaves."""
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from vmoe.moe import MoEMlpBase, iter_moe_mlps

sys.path.insert(0, str(Path(__file__).parent / "timm_models"))
from vmoe_names import create_small_model, vmoe_names  # noqa: E402

NAMES = vmoe_names()


def test_every_vmoe_name_is_in_the_timm_suite():
    assert {"vmoe_paper_h14_e32_every2", "e3_paper_s32_e8_m2_last2", "vmoe_timm_s16_e8_every2", "vmoe"} <= set(NAMES)
    assert not [name for name in NAMES if not name.startswith(("vmoe", "e3_"))]  # timm's vmoe*/e3_* filters


@pytest.mark.parametrize("name", NAMES)
def test_full_size_builds_on_the_meta_device(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    cfg = model.pretrained_cfg
    assert cfg["input_size"][1] == model.patch_embed.img_size[0]  # the size it is built for
    assert model.num_classes == cfg["num_classes"]
    if name != "vmoe_vit_prelogits":  # the one dense name (a backbone with the representation layer)
        assert any(True for _ in iter_moe_mlps(model))


@pytest.mark.parametrize("name", ["vmoe_paper_s32_e8_last2", "e3_paper_s32_e8_m2_last2", "vmoe_timm_s32_e8_last2"])
def test_torchscript_refuses_with_the_reason(name):
    model = create_small_model(name).eval()
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch.jit.script.*torch.compile"):
        torch.jit.script(model)


def test_moe_blocks_are_fx_leaves_and_the_traced_e3_model_still_rejects_a_mask():
    assert MoEMlpBase in get_notrace_modules()
    model = create_small_model("e3_paper_s32_e8_m2_last2").eval()
    layer_types = {type(layer) for _, layer in iter_moe_mlps(model)}
    assert layer_types <= set(get_notrace_modules())  # timm compares classes exactly
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    graph = create_feature_extractor(model, return_nodes=[get_graph_node_names(model, tracer_kwargs=kwargs)[1][-1]],
                                     tracer_kwargs=kwargs)  # as timm's own FX tests trace
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(next(iter(graph(x).values())), model(x))
        with pytest.raises(ValueError, match="E³ models take no attn_mask"):
            graph(x, torch.zeros(2, 5, 5, dtype=torch.bool))


def test_a_representation_layer_is_timms_head_hidden_size():
    model = timm.create_model("vmoe_vit_prelogits", img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                              representation_size=48, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[-1] == model.num_features == 32  # forward_features' width
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size) == (2, 48)
        model.reset_classifier(0)
        assert model(x).shape == (2, 48)
