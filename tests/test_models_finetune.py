"""create_vmoe(checkpoint_path=V-MoE weights) at another image size, class count and channel count."""
import torch
from timm.layers import resample_abs_pos_embed

from vmoe.models import create_vmoe, save_weights
from vmoe.models.finetune import finetune_state_dict

ARGS = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2, moe_layers=[1], num_experts=4)


def test_v_moe_weights_fine_tune_to_a_new_grid_classes_and_channels(tmp_path):
    source = create_vmoe("vit_tiny_patch16_224", img_size=16, num_classes=5, **ARGS)
    path = save_weights(source, tmp_path / "w.safetensors")
    model = create_vmoe("vit_tiny_patch16_224", img_size=8, num_classes=3, in_chans=1, checkpoint_path=path, **ARGS)
    want = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(2, 2), old_size=(4, 4), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, want) and torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])
    assert model.head.weight.shape == (3, 16)  # reset: the model's own fresh head
    assert torch.allclose(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))
    for key in ("blocks.1.mlp.experts.fc1_weight", "blocks.1.mlp.router.weight", "blocks.0.attn.qkv.weight"):
        assert torch.equal(model.state_dict()[key], source.state_dict()[key])


def test_same_shapes_pass_through_unchanged():
    model = create_vmoe("vit_tiny_patch16_224", img_size=8, num_classes=3, **ARGS)
    state = {key: value.clone() + 1 for key, value in model.state_dict().items()}
    out = finetune_state_dict(state, model)
    assert all(torch.equal(out[key], state[key]) for key in state)
