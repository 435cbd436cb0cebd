"""The paper's V-MoE / E³ architectures in timm's registry (built on the meta device: no memory)."""
import pytest
import timm
import torch

import vmoe  # noqa: F401  (registers the names)
from vmoe.models import moe_block_indices
from vmoe.models.ensemble import EnsemblePreLogitsViT
from vmoe.models.vit_prelogits import PreLogitsViT

# name -> (width, blocks, heads, MLP, patch, MoE blocks, E, K)
PAPER = {
    "vmoe_paper_s32_e8_last2": (512, 8, 8, 2048, 32, [5, 7], 8, 2),
    "vmoe_paper_b32_e32_every2": (768, 12, 12, 3072, 32, [1, 3, 5, 7, 9, 11], 32, 2),
    "vmoe_paper_b16_e8_every2": (768, 12, 12, 3072, 16, [1, 3, 5, 7, 9, 11], 8, 2),
    "vmoe_paper_l16_e32_every2": (1024, 24, 16, 4096, 16, list(range(1, 24, 2)), 32, 2),
    "vmoe_paper_h14_e32_every2": (1280, 32, 16, 5120, 14, list(range(1, 32, 2)), 32, 2),
    "e3_paper_s32_e8_m2_last2": (512, 8, 8, 2048, 32, [5, 7], 8, 1),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_architectures(name):
    width, depth, heads, mlp, patch, moe, experts, k = PAPER[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (width, depth, heads)
    assert model.blocks[0].mlp.fc1.out_features == mlp and model.patch_embed.proj.kernel_size == (patch, patch)
    assert type(model.blocks[0].mlp.act).__name__ == "GELUTanh" and model.blocks[0].norm1.eps == 1e-6
    assert moe_block_indices(model) == moe
    layer = model.blocks[moe[0]].mlp
    assert (layer.num_experts, layer.k) == (experts, k) and model.pos_embed.shape == (1, (224 // patch) ** 2 + 1, width)
    assert isinstance(model, EnsemblePreLogitsViT) == name.startswith("e3_")
    if name.startswith("e3_"):
        assert model.ensemble_size == 2 and model.ensemble_start == 5 and layer.ensemble_size == 2


def test_paper_names_take_timm_and_moe_overrides():
    model = timm.create_model("vmoe_paper_s32_e8_last2", img_size=64, num_classes=10, embed_dim=32, num_heads=2,
                              representation_size=16, group_size=10, batch_priority=True).eval()
    assert isinstance(model, PreLogitsViT) and model.pre_logits.fc.weight.shape == (16, 32)
    assert model.head.weight.shape == (10, 16) and model.blocks[7].mlp.group_size == 10
    assert model.blocks[7].mlp.settings.batch_priority
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    model.reset_classifier(4)
    assert model.head.weight.shape == (4, 16) and model.forward_head(torch.randn(2, 5, 32), pre_logits=True).shape == (2, 16)
