"""ImageClassifier: network choice, loss terms, parameter groups, eval routing, once-per-step router hook."""
import lightning as L
import pytest
import torch
from torch import nn

from vmoe.moe import RoutingSettings, iter_moe_mlps
from vmoe.train import ImageClassifier, warmup_decay_factor
from vmoe.train.data import DigitsDataModule

TINY = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1,
            model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))


def test_vmoe_and_dense_networks():
    moe = ImageClassifier(**TINY, moe_layers="every-2", num_experts=4)
    dense = ImageClassifier(**TINY, moe_layers=None)
    assert [name for name, _ in iter_moe_mlps(moe.model)] == ["blocks.1.mlp"]
    assert not list(iter_moe_mlps(dense.model))
    x = torch.randn(3, 1, 8, 8)
    assert moe(x).shape == dense(x).shape == (3, 10)
    moe.train()
    moe(x)
    assert moe.aux_loss().item() > 0  # importance + load losses of the one MoE layer
    assert dense.aux_loss().item() == 0
    # Same width/depth: the dense model equals the V-MoE minus the extra experts and the router.
    n_moe = sum(p.numel() for p in moe.model.parameters())
    n_dense = sum(p.numel() for p in dense.model.parameters())
    mlp = 32 * 64 + 64 + 64 * 32 + 32
    assert n_moe - n_dense == 3 * mlp + 4 * 32


def test_parameter_groups_skip_decay_on_biases_norms_and_embeddings():
    m = ImageClassifier(**TINY, num_experts=4, weight_decay=0.1)
    decay, no_decay = m._param_groups()
    names = {id(p): n for n, p in m.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"blocks.1.mlp.router.weight", "blocks.1.mlp.experts.fc1_weight", "head.weight"} <= decayed
    assert {"blocks.1.mlp.experts.fc1_bias", "pos_embed", "cls_token", "norm.weight"} <= skipped
    assert len(decayed) + len(skipped) == len(names)


def test_routing_settings_reach_every_moe_layer_once():
    m = ImageClassifier(**{**TINY, "model_kwargs": {**TINY["model_kwargs"], "depth": 4}}, num_experts=4,
                        eval_capacity_factor=0.5, batch_priority=True, group_size=17, bfloat16_dispatch=True)
    layers = [layer for _, layer in iter_moe_mlps(m.model)]
    assert len(layers) == 2
    assert all(layer.settings == RoutingSettings(k=2, capacity_factor=1.05, eval_capacity_factor=0.5,
                                                 batch_priority=True, group_size=17, noise_std=1.0,
                                                 bfloat16_dispatch=True) for layer in layers)
    m = ImageClassifier(**TINY, num_experts=4)  # None: the training factor
    assert all(layer.settings.eval_capacity_factor == layer.settings.capacity_factor == 1.05
               for _, layer in iter_moe_mlps(m.model))
    # the module no longer pushes settings at stage starts: a set_routing change stays
    assert not hasattr(m, "apply_routing_settings")


def test_bad_arguments():
    with pytest.raises(ValueError, match="dense"):
        ImageClassifier(**TINY, moe_layers=None, eval_capacity_factor=0.5)
    with pytest.raises(ValueError, match="model_kwargs must not set"):
        ImageClassifier(**{**TINY, "model_kwargs": {"num_classes": 3}})
    with pytest.raises(ValueError, match="optimizer"):
        ImageClassifier(**TINY, optimizer="lion")
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier(**TINY, label_smoothing=1.0)


class _CountSteps(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def on_optimizer_step(self):
        self.calls += 1


def test_router_hook_once_per_optimizer_step_and_lr_schedule(tmp_path):
    m = ImageClassifier(**TINY, num_experts=4, lr=0.01, warmup_steps=2, lr_decay="linear")
    m.model.counter = _CountSteps()
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(m, DigitsDataModule(img_size=8, batch_size=16))
    assert m.model.counter.calls == 3  # 6 micro-batches, 3 optimizer steps
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * warmup_decay_factor(3, warmup_steps=2, total_steps=3, decay="linear"))
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc1", "train/acc5", "train/aux_loss", "train/moe/block1/load_cv",
            "train/moe/block1/dropped_fraction"} <= set(metrics)


def test_upcycle_from_a_dense_checkpoint(tmp_path):
    from vmoe.models import save_weights

    dense = ImageClassifier(**TINY, moe_layers=None)
    path = save_weights(dense.model, tmp_path / "dense.safetensors")
    moe = ImageClassifier(**TINY, num_experts=4, checkpoint_path=str(path))
    experts = moe.model.blocks[1].mlp.experts
    fc1 = dense.model.blocks[1].mlp.fc1
    assert all(torch.equal(experts.fc1_weight[e], fc1.weight) for e in range(4))
    assert torch.equal(moe.model.blocks[0].mlp.fc1.weight, dense.model.blocks[0].mlp.fc1.weight)
    assert torch.equal(moe.model.head.weight, dense.model.head.weight)
    # And the dense model reloads its own weights.
    again = ImageClassifier(**TINY, moe_layers=None, checkpoint_path=str(path))
    assert torch.equal(again.model.pos_embed, dense.model.pos_embed)


@pytest.mark.parametrize("router", ["switch", "soft", "expert_choice"])
def test_other_routing_schemes_take_their_own_defaults(router):
    m = ImageClassifier(**TINY, num_experts=4, router=router)
    m.train()
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    m.on_validation_start()  # resetting eval routing to the defaults is valid for every scheme
