"""E³: the ensemble router (hand-computed), the block's row order, the model's repeat, CLI training."""
import math

import pytest
import timm
import torch

from vmoe.models import create_vmoe
from vmoe.models.ensemble import EnsembleVisionTransformer
from vmoe.moe import EnsembleMoEMlp, build_moe_mlp
from routed import Routed
from vmoe.moe.routers import EnsembleRouter
from vmoe.moe.routers.ensemble import member_gates


def test_member_gates_are_block_diagonal():
    logits = torch.tensor([[[[0.0, math.log(3.0)], [math.log(2.0), 0.0]]]])  # [G=1, S/M=1, M=2, E/M=2]
    gates = member_gates(logits)
    want = torch.tensor([[[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 2 / 3, 1 / 3]]])
    assert torch.allclose(gates, want)


def test_router_routes_each_member_among_its_own_experts():
    router = Routed("ensemble", 4, dim=2, k=1, ensemble_size=2).eval()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]))
    # rows: (token 0, member 0), (token 0, member 1), (token 1, member 0), (token 1, member 1)
    x = torch.tensor([[[math.log(2.0), 0.0], [0.0, math.log(3.0) / 2], [0.0, 5.0], [5.0, 0.0]]])
    out = router(x)
    # member 0 softmax over experts 0,1 of logits [x0, x1]; member 1 over experts 2,3 of [2 x0, 2 x1]
    assert out.routing.expert_index[0, :, 0].tolist() == [0, 3, 1, 2]
    want = torch.tensor([2 / 3, 3 / 4, 1 / (1 + math.exp(-5.0)), 1 / (1 + math.exp(-10.0))])
    assert torch.allclose(out.routing.combine_weights[0, :, 0], want)
    assert router.capacity(4) == 4  # capacity from the total E: ceil(4 * 1 * 1.05 / 4) = 2 -> 4
    with pytest.raises(ValueError, match="multiple of ensemble_size=2"):
        router(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts / ensemble_size = 2\]"):
        Routed("ensemble", 4, dim=2, k=3, ensemble_size=2)
    with pytest.raises(ValueError, match="multiple of ensemble_size=3"):
        EnsembleRouter(dim=2, num_experts=4, ensemble_size=3)


def test_block_orders_rows_image_token_member_and_restores_sequences():
    torch.manual_seed(0)
    block = build_moe_mlp(router="ensemble", in_features=6, hidden_features=8, num_experts=4, k=1,
                          capacity_factor=4.0, ensemble_size=2).eval()
    assert isinstance(block, EnsembleMoEMlp)
    x = torch.randn(3 * 2, 5, 6)  # B=3 images x M=2 members, T=5
    with torch.no_grad():
        y = block(x)
        routing = block.last_routing  # [B*M, T, K] like the sequences
        for b in range(3):
            for m in range(2):
                for t in range(5):
                    e = int(routing.expert_index[b * 2 + m, t, 0])
                    assert m * 2 <= e < m * 2 + 2  # the member's own experts
                    gates = torch.softmax(x[b * 2 + m, t] @ block.router.weight[m * 2:m * 2 + 2].T, -1)
                    want = gates[e - m * 2] * block.experts.forward_expert(e, x[b * 2 + m, t][None])[0]
                    assert torch.allclose(y[b * 2 + m, t], want, atol=1e-6)
    with pytest.raises(ValueError, match="repeating the batch"):
        block(torch.randn(3, 5, 6))
    with pytest.raises(ValueError, match="group_size=5 must be a multiple of ensemble_size=2"):
        build_moe_mlp(router="ensemble", in_features=6, num_experts=4, k=1, group_size=5, ensemble_size=2)


def _tiny_e3(**kwargs):
    return create_vmoe("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=4, num_heads=2,
                       num_classes=5, moe_layers=[1, 3], num_experts=4, k=1, router="ensemble",
                       moe_kwargs={"ensemble_size": 2}, **kwargs)


def test_e3_model_repeats_before_the_first_moe_block_and_returns_log_mean_softmax():
    model = _tiny_e3().eval()
    assert isinstance(model, EnsembleVisionTransformer) and model.ensemble_start == 1
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        members = model.forward_members(x)
        assert members.shape == (3, 2, 5) and not torch.allclose(members[:, 0], members[:, 1])
        want = members.softmax(-1).mean(1).log()  # the reference's ensemble: log of the mean probability
        assert torch.allclose(model(x), want, atol=1e-6)
        assert not torch.allclose(model(x), members.log_softmax(-1).mean(1), atol=1e-3)
        # with member 1's experts and router made equal to member 0's, both members compute the same
        for i in (1, 3):
            mlp = model.blocks[i].mlp
            for p in (mlp.experts.fc1_weight, mlp.experts.fc1_bias, mlp.experts.fc2_weight, mlp.experts.fc2_bias,
                      mlp.router.weight):
                p[2:] = p[:2]
        same = model.forward_members(x)
        assert torch.allclose(same[:, 0], same[:, 1], atol=1e-6)
    assert set(model.state_dict()) == set(_tiny_e3().state_dict())  # timm keys, no wrapper


def test_e3_trains_through_the_cli(tmp_path):
    from test_train_cli import TINY, _last_metrics
    from vmoe.train.cli import main

    root = tmp_path / "e3"
    main(["fit", *TINY, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "3",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3", "--model.router", "ensemble",
          "--model.k", "1", "--model.num_experts", "4", "--model.moe_kwargs", '{"ensemble_size": 2}'])
    metrics = _last_metrics(root / "lightning_logs" / "version_0")
    assert math.isfinite(metrics["val/loss"]) and 0 <= metrics["val/acc1"] <= 1
    ckpt = torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["model.blocks.1.mlp.router.weight"].shape == (4, 32)


def test_e3_loss_is_the_members_cross_entropy_in_training_and_the_ensembles_in_eval():
    from vmoe.train import ImageClassifier

    module = ImageClassifier("vit_tiny_patch16_224", num_classes=5, img_size=8, in_chans=3, moe_layers=[1],
                             num_experts=4, k=1, router="ensemble", moe_kwargs={"ensemble_size": 2},
                             model_kwargs=dict(patch_size=4, embed_dim=16, depth=2, num_heads=2)).eval()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    logged = {}
    module.log = lambda name, value, **k: logged.setdefault(name, value)
    members = module.model.forward_members(x)
    train = module._shared_step((x, y), "train")
    want = torch.nn.functional.cross_entropy(members.flatten(0, 1), y.repeat_interleave(2)) + module.aux_loss()
    assert torch.allclose(train, want, atol=1e-6)
    val = module._shared_step((x, y), "val")
    ensemble = members.softmax(-1).mean(1)  # [B, N] probabilities
    want = -ensemble[torch.arange(4), y].log().mean() + module.aux_loss()
    assert torch.allclose(val, want, atol=1e-6)
    assert not torch.allclose(val, train, atol=1e-4)  # the two losses really differ on these weights
    assert logged["val/acc1"].compute() == (ensemble.argmax(-1) == y).float().mean()


def test_e3_timm_api_has_the_image_batch_axis():
    model = _tiny_e3().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)  # member rows [B*M, T, D]
        assert feats.shape == (6, 5, 16)
        members = model.forward_members(x)
        assert torch.allclose(model.forward_head(feats), model(x))
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (3, 16)
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, feats) and [t.shape for t in inter] == [(3, 16, 2, 2)] * 4
        # block 0 is before the repeat (one row per image); block 3 is the members' mean
        rows = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        rows = model.blocks[0](rows)
        assert torch.allclose(inter[0], rows[:, 1:].reshape(3, 2, 2, 16).permute(0, 3, 1, 2), atol=1e-6)
        rows = rows.repeat_interleave(2, 0)
        for block in model.blocks[1:]:
            rows = block(rows)
        mean = rows.unflatten(0, (3, 2)).mean(1)[:, 1:]
        assert torch.allclose(inter[3], mean.reshape(3, 2, 2, 16).permute(0, 3, 1, 2), atol=1e-6)
        model.reset_classifier(0)
        assert torch.allclose(model(x), pre, atol=1e-6)
    assert members.shape == (3, 2, 5)
    net = timm.create_model("e3_paper_s32_e8_m2_last2", features_only=True, out_indices=(1, 3), img_size=64,
                            embed_dim=16, depth=4, num_heads=2).eval()  # timm's FeatureGetterNet
    with torch.no_grad():
        out = net(torch.randn(3, 3, 64, 64))
    assert [t.shape for t in out] == [(3, 16, 2, 2)] * 2


def test_e3_eval_model_exports_and_equals_eager():
    model = _tiny_e3().eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), model(x2), atol=1e-5, rtol=1e-5)
