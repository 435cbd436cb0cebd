"""DeepSeek-V3 router (vmoe/moe/routers/deepseek_v3.py): auxiliary-loss-free bias balancing, normalised
unbiased combine weights, group-limited routing, sequence-wise balance loss."""
import pytest
import torch

from routed import Routed
from vmoe.moe import MoEMlp
from vmoe.moe.losses import sequence_balance_loss
from vmoe.moe.routers import after_optimizer_step

D, H = 16, 64


def v3(num_experts=4, k=1, **kw):
    routed = Routed("deepseek_v3", num_experts, k=k, capacity_factor=8.0, **kw)
    with torch.no_grad():
        routed.router.weight.copy_(torch.eye(num_experts))
    return routed


def test_v3_bias_moves_against_overloaded_experts_and_changes_selection_only():
    router = v3(gamma=0.5).train()
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0]] * 3])  # sigmoid scores [.731, .5, .5, .5]: all pick e0
    out = router(x)
    assert out.routing.expert_index.flatten().tolist() == [0, 0, 0]
    router.on_optimizer_step()  # load [3, 0, 0, 0], mean .75 -> sign(mean - load) = [-1, 1, 1, 1]
    torch.testing.assert_close(router.expert_bias, torch.tensor([-.5, .5, .5, .5]))
    assert router.load_since_step.sum() == 0
    out = router(x)  # biased [.231, 1, 1, 1]: e0 is no longer chosen
    assert (out.routing.expert_index != 0).all()
    # The bias picks the expert; the weight is the unbiased score normalised over the K=1 choice = 1.
    torch.testing.assert_close(out.routing.combine_weights, torch.ones(1, 3, 1))


def test_v3_k2_weights_are_normalised_unbiased_scores():
    router = v3(k=2).eval()
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    # scores sigmoid([2, 1, 0, -1]) = [.880797, .731059, .5, .268941]; the bias forces e3 into the top-2:
    # chosen (e3, e0), weights [.268941, .880797] / 1.149738 = [.233915, .766085].
    out = router(torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]))
    assert out.routing.expert_index.tolist() == [[[3, 0]]]
    torch.testing.assert_close(out.routing.combine_weights, torch.tensor([[[.233915, .766085]]]))


def test_v3_bias_update_counts_all_micro_batches_of_a_step():
    router = v3(gamma=0.1).train()
    router(torch.tensor([[[1.0, 0, 0, 0]] * 3]))  # micro-batch 1: 3 tokens -> e0
    router(torch.tensor([[[0, 1.0, 0, 0]]]))  # micro-batch 2: 1 token -> e1
    router.on_optimizer_step()  # load [3, 1, 0, 0], mean 1 -> [-1, 0, 1, 1]
    torch.testing.assert_close(router.expert_bias, torch.tensor([-.1, 0, .1, .1]))
    # Eval forwards never count; a step with no training forward leaves the bias alone.
    router.eval()(torch.tensor([[[1.0, 0, 0, 0]]]))
    router.on_optimizer_step()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-.1, 0, .1, .1]))


def test_v3_bias_survives_checkpoint_round_trip(tmp_path):
    layer = MoEMlp(D, H, num_experts=4, k=2, router="deepseek_v3", router_kwargs={"gamma": 0.01}).train()
    for _ in range(3):
        layer(torch.randn(2, 8, D))
        after_optimizer_step(layer)
    bias = layer.router.expert_bias.clone()
    assert bias.abs().sum() > 0
    state = layer.state_dict()
    assert "router.expert_bias" in state and "router.load_since_step" not in state
    path = tmp_path / "layer.pt"
    torch.save(state, path)
    fresh = MoEMlp(D, H, num_experts=4, k=2, router="deepseek_v3")
    fresh.load_state_dict(torch.load(path))
    torch.testing.assert_close(fresh.router.expert_bias, bias)
    # The same through a model's safetensors weights file.
    models = pytest.importorskip("vmoe.models")
    arch = dict(moe_layers="last-1", num_experts=4, router="deepseek_v3", img_size=8, patch_size=4, embed_dim=D,
                depth=2, num_heads=2, num_classes=3)
    model = models.create_vmoe("vit_tiny_patch16_224", **arch)
    model.blocks[1].mlp.router.expert_bias.copy_(bias)
    models.save_weights(model, tmp_path / "model.safetensors")
    loaded = models.load_weights(models.create_vmoe("vit_tiny_patch16_224", **arch), tmp_path / "model.safetensors")
    torch.testing.assert_close(loaded.blocks[1].mlp.router.expert_bias, bias)


def test_v3_group_limited_and_sequence_loss_in_the_layer():
    torch.manual_seed(0)
    layer = MoEMlp(D, H, num_experts=8, k=2, router="deepseek_v3", group_size=4,
                   router_kwargs={"num_groups": 4, "topk_groups": 1}).train()
    x = torch.randn(2, 6, D)
    layer(x)
    index = layer.last_routing.expert_index  # [B, T, K]
    assert (index[..., 0] // 2 == index[..., 1] // 2).all()  # both experts of a token in one group of 2
    # The sequence loss is per image (T = 6 tokens) although routing groups are 4 tokens.
    scores = (x @ layer.router.weight.T).sigmoid()
    expected = sequence_balance_loss(scores, index)
    torch.testing.assert_close(layer.metrics["sequence_balance_loss"], expected)
    torch.testing.assert_close(layer.aux_loss, 1e-4 * expected)


def test_v3_bias_updates_once_per_optimizer_step_under_lightning_accumulation(tmp_path):
    L = pytest.importorskip("lightning")
    module = pytest.importorskip("vmoe.train.module")
    from torch.utils.data import DataLoader, TensorDataset

    model = module.ImageClassifier(
        backbone="vit_tiny_patch16_224", num_classes=3, img_size=8, in_chans=1, moe_layers="last-1", num_experts=4,
        k=2, router="deepseek_v3", moe_kwargs={"router_kwargs": {"gamma": 0.01}},
        model_kwargs=dict(patch_size=4, embed_dim=16, depth=2, num_heads=2))
    router = model.model.blocks[1].mlp.router
    calls, loads = [], []
    original = router.on_optimizer_step

    def counting_hook():
        calls.append(1)
        loads.append(router.load_since_step.clone())
        original()

    router.on_optimizer_step = counting_hook
    data = DataLoader(TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))), batch_size=4)
    trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=data)
    # 4 micro-batches of 4 images x 5 tokens x k=2 -> 2 optimizer steps, each seeing 2 micro-batches = 80 choices.
    assert len(calls) == 2 and [int(load.sum()) for load in loads] == [80, 80]
    assert router.expert_bias.abs().max() <= 0.02 + 1e-6
