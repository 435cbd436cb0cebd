"""create_vmoe / convert_to_moe: placement parsing, the swapped blocks, and timm's model API."""
import functools

import pytest
import timm
import torch
from torch import nn

from vmoe.models import aux_loss, convert_to_moe, create_vmoe, mlp_config, moe_block_indices, parse_moe_layers
from vmoe.moe import MoEMlp

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)


@pytest.mark.parametrize("spec, depth, expected", [
    ("every-2", 12, [1, 3, 5, 7, 9, 11]),
    ("every-3", 12, [2, 5, 8, 11]),
    ("every-1", 4, [0, 1, 2, 3]),
    ("every-12", 12, [11]),
    ("last-2", 12, [9, 11]),
    ("last-5", 24, [15, 17, 19, 21, 23]),
    ("last-2", 5, [1, 3]),
    ([0, 3, 2], 4, [0, 2, 3]),
    ((1,), 2, [1]),
])
def test_parse_moe_layers(spec, depth, expected):
    assert parse_moe_layers(spec, depth) == expected


@pytest.mark.parametrize("spec", ["every-0", "every-13", "last-0", "last-7", "odd", "every2", "", [], [12], [-1],
                                  [1, 1], [True], [1.0], 3, None])
def test_parse_moe_layers_errors_name_value_and_range(spec):
    with pytest.raises(ValueError) as err:
        parse_moe_layers(spec, 12)
    message = str(err.value)
    assert "moe_layers=" in message and "[0, 11]" in message and "1 <= n <= 12" in message and "1 <= n <= 6" in message


def test_create_vmoe_swaps_chosen_blocks_with_dense_mlp_settings():
    model = create_vmoe("vit_small_patch16_224", moe_layers="every-2", num_experts=4, k=2, capacity_factor=1.5,
                        eval_capacity_factor=2.0, batch_priority=True, noise_std=0.5, **TINY)
    assert moe_block_indices(model) == [1, 3]
    for i, block in enumerate(model.blocks):
        if i in (1, 3):
            mlp = block.mlp
            assert isinstance(mlp, MoEMlp) and mlp.num_experts == 4 and mlp.k == 2
            assert mlp.experts.fc1_weight.shape == (4, 128, 32) and mlp.experts.fc2_bias.shape == (4, 32)
            assert isinstance(mlp.experts.act, nn.GELU)
            s = mlp.settings
            assert (s.capacity_factor, s.eval_capacity_factor, s.batch_priority, s.noise_std) == (1.5, 2.0, True, 0.5)
        else:
            assert isinstance(block.mlp, timm.layers.Mlp)
    logits = model(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 5)
    assert torch.isfinite(aux_loss(model))


def test_pyramid_expert_counts_and_moe_kwargs():
    model = create_vmoe("vit_small_patch16_224", moe_layers=[0, 2, 3], num_experts=[2, 4, 8], k=1,
                        moe_kwargs={"router_kwargs": {"renormalize": True}, "importance_weight": 0.1}, **TINY)
    assert [model.blocks[i].mlp.num_experts for i in (0, 2, 3)] == [2, 4, 8]
    assert all(model.blocks[i].mlp.router.renormalize for i in (0, 2, 3))
    assert model.blocks[0].mlp.router.importance_weight == 0.1
    with pytest.raises(ValueError, match=r"one count per MoE block \(3 blocks"):
        create_vmoe("vit_small_patch16_224", moe_layers=[0, 2, 3], num_experts=[2, 4], **TINY)
    with pytest.raises(ValueError, match=r"moe_kwargs repeats.*'k'"):
        create_vmoe("vit_small_patch16_224", moe_kwargs={"k": 1}, **TINY)


@pytest.mark.parametrize("router", ["expert_choice", "soft", "switch"])
def test_other_routers_get_their_own_defaults(router):
    model = create_vmoe("vit_small_patch16_224", num_experts=4, router=router, **TINY)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match="noise_std"):
        create_vmoe("vit_small_patch16_224", num_experts=4, router=router, noise_std=1.0, **TINY)


def test_bias_free_and_tanh_gelu_mlps_are_mirrored():
    dense = timm.create_model("vit_small_patch16_224", **TINY)
    for block in dense.blocks:
        block.mlp = timm.layers.Mlp(32, 64, act_layer=functools.partial(nn.GELU, approximate="tanh"), bias=False,
                                    drop=0.1)
    cfg = mlp_config(dense.blocks[0].mlp)
    assert (cfg["hidden_features"], cfg["bias"], cfg["drop"]) == (64, False, 0.1)
    convert_to_moe(dense, moe_layers="last-1", num_experts=2, k=1)
    experts = dense.blocks[3].mlp.experts
    assert experts.fc1_bias is None and experts.fc1_weight.shape == (2, 64, 32)
    assert experts.act.approximate == "tanh" and experts.drop.p == 0.1


def test_unsupported_mlp_raises():
    model = timm.create_model("vit_small_patch16_224", mlp_layer=timm.layers.SwiGLUPacked, **TINY)
    with pytest.raises(ValueError, match="only timm.layers.Mlp"):
        convert_to_moe(model)
    with pytest.raises(ValueError, match="blocks"):
        convert_to_moe(nn.Linear(2, 2))


def test_timm_api_is_kept():
    model = create_vmoe("vit_small_patch16_224", num_experts=4, **TINY)
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    model.set_grad_checkpointing(True)
    model.train()
    (model(x).sum() + aux_loss(model)).backward()
    assert model.blocks[1].mlp.experts.fc1_weight.grad is not None
    assert model.blocks[1].mlp.router.weight.grad is not None
