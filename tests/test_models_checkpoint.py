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


def _lightning_ckpt(state):
    return {"epoch": 0, "pytorch-lightning_version": "2.6.0", "state_dict": {f"model.{k}": v for k, v in state.items()}}


def _write(kind, state, path):
    if kind == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    elif kind == ".ckpt":
        torch.save(_lightning_ckpt(state), path)
    else:
        torch.save(state, path)


# (file kind, what is wrong with one tensor of an otherwise fitting state dict, the message)
BAD_TENSORS = [
    (".pth", "sparse", "layout torch.sparse_coo"),
    (".ckpt", "sparse", "layout torch.sparse_coo"),
    (".pth", "nan", "1 of 16384 values are NaN or infinite"),
    (".safetensors", "nan", "1 of 16384 values are NaN or infinite"),
    (".ckpt", "inf", "1 of 16384 values are NaN or infinite"),
    (".safetensors", "int", "dtype torch.int32 where the model has torch.float32"),
    (".pth", "complex", "dtype torch.complex64 where the model has torch.float32"),
]


@pytest.mark.parametrize("kind, defect, message", BAD_TENSORS, ids=[f"{k}-{d}" for k, d, _ in BAD_TENSORS])
def test_a_failing_load_changes_no_tensor(tmp_path, kind, defect, message):
    """Keys and shapes fit, but one tensor (sorted after half of the keys) cannot be copied: no tensor moves."""
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in vmoe_model().state_dict().items()}
    key = "blocks.3.mlp.experts.fc1_weight"  # the 4th MoE tensor of the last block: most keys sort before it
    assert sorted(state).index(key) > len(state) // 2
    value = state[key]
    if defect == "sparse":
        state[key] = value.to_sparse()
    elif defect in ("nan", "inf"):
        value[0, 0, 0] = float(defect)
    elif defect == "int":
        state[key] = value.to(torch.int32)
    elif defect == "complex":
        state[key] = value.to(torch.complex64)
    path = tmp_path / f"bad{kind}"
    _write(kind, state, path)
    model = vmoe_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_weights(model, path)
    assert f"unusable:   {key}: {message}" in str(err.value) and "nothing was loaded" in str(err.value)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def _damaged(tmp_path, kind, how):
    path = tmp_path / f"w{kind}"
    if how == "random":
        path.write_bytes(os.urandom(4096))
        return path
    _write(kind, vmoe_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[:len(data) // 2])
    return path


@pytest.mark.parametrize("kind, how, message", [
    (".pth", "empty", "the file is empty"),
    (".safetensors", "empty", "the file is empty"),
    (".ckpt", "empty", "the file is empty"),
    (".safetensors", "truncated", "a truncated .safetensors file: its header lists"),
    (".ckpt", "truncated", "the torch.save archive is damaged or truncated"),
    (".pth", "truncated", "the torch.save archive is damaged or truncated"),
    (".pth", "random", "not a torch checkpoint: neither a torch.save zip archive nor a pickle"),
    (".safetensors", "random", "not a .safetensors file"),
])
def test_damaged_files_name_the_file_and_the_cause(tmp_path, kind, how, message):
    from vmoe.models import upcycle
    path = _damaged(tmp_path, kind, how)
    model = vmoe_model()
    before = snapshot(model)
    readers = [lambda: load_weights(model, path), lambda: read_state_dict(path),
               lambda: vmoe_model(checkpoint_path=path),
               lambda: upcycle(path, "vit_small_patch16_224", num_experts=4, **ARCH)]
    for read in readers:
        with pytest.raises(ValueError) as err:
            read()
        text = str(err.value)
        assert str(path) in text and message in text, text
        assert "weights_only=False" not in text  # never advise the unsafe loader for a broken file
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_random_bytes_starting_like_a_pickle_do_not_advise_the_unsafe_loader(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"\x80" + bytes(range(7, 250)))
    with pytest.raises(ValueError, match="the pickle is damaged or truncated") as err:
        read_state_dict(path)
    assert "weights_only=False" not in str(err.value)


def test_a_safetensors_file_under_a_torch_suffix_is_named(tmp_path):
    good = save_weights(vmoe_model(), tmp_path / "w.safetensors")
    wrong = tmp_path / "w.pth"
    wrong.write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="it looks like a .safetensors file"):
        read_state_dict(wrong)
