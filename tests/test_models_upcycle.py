"""Sparse upcycling from dense ViT files (.pth, .safetensors, timm and Lightning checkpoints) and instances."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vmoe.models import create_vmoe, moe_block_indices, upcycle, upcycle_state_dict

BACKBONE = "vit_small_patch16_224"
ARCH = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)


def dense_vit(img_size=16, num_classes=5):
    torch.manual_seed(1)
    model = timm.create_model(BACKBONE, img_size=img_size, num_classes=num_classes, **ARCH).eval()
    with torch.no_grad():  # timm zero-inits biases; random ones make the copy checks meaningful
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def assert_upcycled(moe, dense_state, num_experts):
    """Every dense tensor reappears in the V-MoE: MLPs of MoE blocks once per expert, the rest as is."""
    moe_state = moe.state_dict()
    moe_blocks = moe_block_indices(moe)
    checked = 0
    for key, value in dense_state.items():
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        if block in moe_blocks and ".mlp." in key:
            layer, param = key.rsplit(".mlp.", 1)[0] + ".mlp", key.rsplit(".mlp.", 1)[1]
            stacked = moe_state[f"{layer}.experts.{param.replace('.', '_')}"]
            assert stacked.shape == (num_experts, *value.shape), key
            for e in range(num_experts):
                assert torch.equal(stacked[e], value), (key, e)
        else:
            assert torch.equal(moe_state[key], value), key
        checked += 1
    assert checked == len(dense_state)
    for block in moe_blocks:
        router = moe_state[f"blocks.{block}.mlp.router.weight"]
        assert router.shape == (num_experts, 32) and 0 < router.std() < 0.02


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_upcycle_from_file_copies_every_tensor(tmp_path, suffix):
    dense = dense_vit()
    state = dense.state_dict()
    path = tmp_path / f"dense{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    moe = upcycle(path, BACKBONE, moe_layers="every-2", num_experts=4, k=2, img_size=16, num_classes=5, **ARCH)
    assert moe_block_indices(moe) == [1, 3]
    assert_upcycled(moe, state, 4)


@pytest.mark.parametrize("wrap", ["timm", "model", "ddp"])
def test_upcycle_from_checkpoint_dicts(tmp_path, wrap):
    dense = dense_vit()
    state = dense.state_dict()
    obj = {"timm": {"epoch": 3, "arch": BACKBONE, "state_dict": state, "version": 2},
           "model": {"model": state, "epoch": 1},
           "ddp": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(obj, tmp_path / "ckpt.pth")
    moe = upcycle(tmp_path / "ckpt.pth", BACKBONE, num_experts=2, img_size=16, num_classes=5, **ARCH)
    assert_upcycled(moe, state, 2)


def test_upcycle_from_lightning_checkpoint(tmp_path):
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = dense_vit().train()
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(5))  # a buffer outside the network

        def training_step(self, batch, _):
            x, y = batch
            return self.criterion(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = Classifier()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 16, 16),
                                                                      torch.randint(0, 5, (4,))), batch_size=4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    moe = upcycle(tmp_path / "last.ckpt", BACKBONE, num_experts=2, img_size=16, num_classes=5, **ARCH)
    assert_upcycled(moe, module.model.state_dict(), 2)


@pytest.mark.parametrize("num_experts, k", [(4, 4), (4, 2)])
def test_upcycled_logits_equal_dense_with_renormalised_routing(num_experts, k):
    dense = dense_vit()
    x = torch.randn(3, 3, 16, 16)
    renorm = {"router_kwargs": {"renormalize": True}}
    moe = upcycle(dense, moe_layers="every-1", num_experts=num_experts, k=k, capacity_factor=8.0, noise_std=0.0,
                  moe_kwargs=renorm, router_init_std=0.5)
    moe.eval()
    with torch.no_grad():
        expected, got = dense(x), moe(x)
        assert all(m.mlp.metrics["dropped_fraction"] == 0 for m in moe.blocks)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        if k < num_experts:  # the kept gates no longer sum to 1 without renormalisation
            plain = upcycle(dense, moe_layers="every-1", num_experts=num_experts, k=k, capacity_factor=8.0,
                            noise_std=0.0, router_init_std=0.5).eval()
            assert not torch.allclose(plain(x), expected, atol=1e-3)
    assert isinstance(dense.blocks[0].mlp, timm.layers.Mlp)  # the source instance is left unchanged


def test_upcycle_soft_moe_and_residual_moe():
    dense = dense_vit()
    soft = upcycle(dense, router="soft", num_experts=2)
    for e in range(2):
        assert torch.equal(soft.blocks[3].mlp.experts.fc2_weight[e], dense.blocks[3].mlp.fc2.weight)
    fresh = upcycle(dense, num_experts=2, moe_kwargs={"residual": True})
    assert torch.equal(fresh.blocks[1].mlp.residual.mlp.fc1.weight, dense.blocks[1].mlp.fc1.weight)
    assert torch.equal(fresh.blocks[1].mlp.experts.fc1_weight[1], dense.blocks[1].mlp.fc1.weight)


def test_img_size_change_resamples_pos_embed_and_num_classes_resets_head(tmp_path):
    dense = dense_vit(img_size=16, num_classes=5)
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    torch.manual_seed(7)
    moe = upcycle(tmp_path / "dense.pth", BACKBONE, num_experts=2, img_size=24, num_classes=3, **ARCH)
    expected = resample_abs_pos_embed(dense.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4],
                                      num_prefix_tokens=1)
    assert moe.pos_embed.shape == (1, 37, 32) and torch.allclose(moe.pos_embed, expected, atol=1e-6)
    assert moe.head.weight.shape == (3, 32)
    torch.manual_seed(7)
    fresh = create_vmoe(BACKBONE, num_experts=2, img_size=24, num_classes=3, **ARCH)
    assert torch.equal(moe.head.weight, fresh.head.weight)  # the new model's own head, not a slice
    assert torch.equal(moe.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
    assert moe(torch.randn(1, 3, 24, 24)).shape == (1, 3)
    # the same through an instance
    moe2 = upcycle(dense, num_experts=2, img_size=24, num_classes=3)
    assert torch.allclose(moe2.pos_embed, expected, atol=1e-6) and moe2.head.out_features == 3


def test_expert_noise_makes_experts_differ_but_stay_close():
    dense = dense_vit()
    gen = torch.Generator().manual_seed(0)
    moe = upcycle(dense, num_experts=3, expert_noise=0.01, router_init_std=0.0, generator=gen)
    w = moe.blocks[1].mlp.experts.fc1_weight
    base = dense.blocks[1].mlp.fc1.weight
    assert not torch.equal(w[0], w[1])
    assert 0 < (w - base).std() < 0.02 * base.std()
    assert torch.count_nonzero(moe.blocks[1].mlp.router.weight) == 0


def test_mismatched_dense_weights_list_keys(tmp_path):
    dense = dense_vit()
    state = dense.state_dict()
    state.pop("blocks.1.mlp.fc1.bias")
    state["blocks.0.attn.qkv.weight"] = torch.zeros(96, 16)
    state["extra.weight"] = torch.zeros(2)
    moe = create_vmoe(BACKBONE, num_experts=2, img_size=16, num_classes=5, **ARCH)
    with pytest.raises(ValueError) as err:
        upcycle_state_dict(state, moe)
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mismatched" in msg
    assert "blocks.1.mlp.fc1.bias (for blocks.1.mlp.experts.fc1_bias)" in msg
    assert "extra.weight" in msg and "blocks.0.attn.qkv.weight checkpoint (96, 16) vs model (96, 32)" in msg
    with pytest.raises(ValueError, match="needs backbone="):
        upcycle(tmp_path / "x.pth")
    with pytest.raises(ValueError, match="neither an existing checkpoint file nor a timm model"):
        upcycle("not_a_model_name")
    with pytest.raises(ValueError, match="only img_size and num_classes.*depth"):
        upcycle(dense, depth=2)


def test_upcycle_timm_name_uses_timm_pretrained_loading(monkeypatch):
    """upcycle("<timm name>") asks timm for pretrained weights; timm's loader is replaced by a dense state."""
    dense = dense_vit()
    calls = []

    def fake_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        assert pretrained
        model = timm_create(BACKBONE, pretrained=False, **kwargs)
        model.load_state_dict(dense.state_dict())
        return model

    timm_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", fake_create)
    moe = upcycle(f"{BACKBONE}.augreg_in21k_ft_in1k", num_experts=2, img_size=16, num_classes=5, **ARCH)
    assert calls == [(f"{BACKBONE}.augreg_in21k_ft_in1k", True)]
    assert_upcycled(moe, dense.state_dict(), 2)


def test_resampled_embeddings_are_logged_with_their_sizes(tmp_path, caplog):
    dense = dense_vit(img_size=16, num_classes=5)
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    with caplog.at_level("WARNING", logger="vmoe.models.upcycle_weights"):
        upcycle(tmp_path / "dense.pth", BACKBONE, num_experts=2, img_size=24, num_classes=5, **ARCH)
    lines = [r.getMessage() for r in caplog.records if r.name == "vmoe.models.upcycle_weights"]
    assert lines == ["upcycling: resampled pos_embed from (1, 17, 32) to (1, 37, 32) (17 -> 37 positions "
                     "(image size (24, 24)))"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vmoe.models.upcycle_weights"):
        upcycle(tmp_path / "dense.pth", BACKBONE, num_experts=2, img_size=16, num_classes=5,
                **{**ARCH, "patch_size": 8})
    lines = [r.getMessage() for r in caplog.records if r.name == "vmoe.models.upcycle_weights"]
    assert lines == ["upcycling: resampled patch_embed.proj.weight from (32, 3, 4, 4) to (32, 3, 8, 8) "
                     "(patch size (4, 4) -> (8, 8))",
                     "upcycling: resampled pos_embed from (1, 17, 32) to (1, 5, 32) (17 -> 5 positions "
                     "(image size (16, 16)))"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vmoe.models.upcycle_weights"):
        upcycle(tmp_path / "dense.pth", BACKBONE, num_experts=2, img_size=16, num_classes=5, **ARCH)
    assert not [r for r in caplog.records if r.name == "vmoe.models.upcycle_weights"]  # same sizes: nothing to say
