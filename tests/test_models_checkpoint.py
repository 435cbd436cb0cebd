"""save_weights / load_weights: round trips, and mismatches that list keys and leave the model unchanged."""
import os

import pytest
import torch

from vmoe.models import create_vmoe, load_weights, read_state_dict, save_weights

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def vmoe_model(**kwargs):
    return create_vmoe("vit_small_patch16_224", **{"num_experts": 4, **ARCH, **kwargs}).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_is_exact_and_atomic(tmp_path, suffix):
    torch.manual_seed(0)
    source = vmoe_model()
    path = save_weights(source, tmp_path / "sub" / f"w{suffix}")
    assert sorted(os.listdir(path.parent)) == [f"w{suffix}"]  # no temporary file left behind
    torch.manual_seed(1)
    target = vmoe_model()
    assert not torch.equal(target.blocks[1].mlp.experts.fc1_weight, source.blocks[1].mlp.experts.fc1_weight)
    load_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(target(x), source(x))


def test_lightning_checkpoint_loads(tmp_path):
    source = vmoe_model()
    ckpt = {"epoch": 1, "pytorch-lightning_version": "2.6.0",
            "state_dict": {**{f"model.{k}": v for k, v in source.state_dict().items()},
                           "criterion.weight": torch.ones(5)}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert set(read_state_dict(tmp_path / "last.ckpt")) == set(source.state_dict())
    target = load_weights(vmoe_model(), tmp_path / "last.ckpt")
    assert torch.equal(target.blocks[3].mlp.router.weight, source.blocks[3].mlp.router.weight)


@pytest.mark.parametrize("other, expect", [
    (dict(num_experts=8), ["mismatched: blocks.1.mlp.experts.fc1_weight checkpoint (8, 128, 32) vs model "
                           "(4, 128, 32)", "mismatched: blocks.3.mlp.router.weight", "expert count or width"]),
    (dict(mlp_ratio=2.0), ["mismatched: blocks.1.mlp.experts.fc1_weight checkpoint (4, 64, 32) vs model "
                           "(4, 128, 32)", "mismatched: blocks.0.mlp.fc1.weight checkpoint (64, 32)"]),
    (dict(moe_layers="last-1"), ["missing:    blocks.1.mlp.experts.fc1_weight (4, 128, 32)",
                                 "unexpected: blocks.1.mlp.fc1.weight (128, 32)", "MoE placement differs"]),
])
def test_mismatch_lists_keys_and_leaves_model_unchanged(tmp_path, other, expect):
    path = save_weights(vmoe_model(**other), tmp_path / "other.safetensors")
    model = vmoe_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_weights(model, path)
    for text in expect:
        assert text in str(err.value)
    assert "nothing was loaded" in str(err.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dense_weights_hint_at_upcycling(tmp_path):
    import timm
    dense = timm.create_model("vit_small_patch16_224", **ARCH)
    path = save_weights(dense, tmp_path / "dense.safetensors")
    with pytest.raises(ValueError, match="use vmoe.models.upcycle"):
        load_weights(vmoe_model(), path)
    # create_vmoe(checkpoint_path=...) upcycles dense weights and loads V-MoE weights strictly
    model = vmoe_model(checkpoint_path=path)
    assert torch.equal(model.blocks[1].mlp.experts.fc2_weight[3], dense.blocks[1].mlp.fc2.weight)
    again = vmoe_model(checkpoint_path=save_weights(model, tmp_path / "moe.safetensors"))
    assert torch.equal(again.blocks[1].mlp.router.weight, model.blocks[1].mlp.router.weight)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="writes .safetensors, .pth or .pt"):
        save_weights(vmoe_model(), tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        load_weights(vmoe_model(), tmp_path / "missing.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown checkpoint suffix '.txt'"):
        read_state_dict(tmp_path / "w.txt")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hparams": {"obj": object.__new__(torch.nn.Identity)}},
               tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        read_state_dict(tmp_path / "unsafe.pth")
    assert set(read_state_dict(tmp_path / "unsafe.pth", weights_only=False)) == {"a"}
