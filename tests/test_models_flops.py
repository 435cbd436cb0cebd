"""The analytic cost model against hand counts and torch's FlopCounterMode."""
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vmoe.models import create_vmoe, model_cost
from vmoe.train.flops_cli import main

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def counted_flops(model, x):
    for block in model.blocks:  # explicit q@k^T and attn@v: FlopCounterMode skips CPU fused attention
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_dense_count_matches_hand_formula_and_flop_counter():
    model = timm.create_model("vit_small_patch16_224", **ARCH).eval()
    t, d, h = 17, 32, 128  # 16 patches + cls
    patch = 2 * 16 * 32 * 3 * 4 * 4
    block = 2 * t * d * 3 * d + 2 * t * d * d + 4 * t * t * d + 2 * 2 * t * d * h
    hand = patch + 2 * block + 2 * d * 5
    cost = model_cost(model)
    assert cost.flops == hand
    assert cost.params == cost.active_params == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert counted_flops(model, torch.randn(1, 3, 16, 16)) == hand


def test_moe_count_matches_flop_counter_when_nothing_is_dropped():
    model = create_vmoe("vit_small_patch16_224", moe_layers="every-1", num_experts=4, k=2, capacity_factor=8.0,
                        **ARCH).eval()
    with torch.no_grad():
        flops = counted_flops(model, torch.randn(1, 3, 16, 16))
    cost = model_cost(model)
    assert cost.flops == flops
    dense = model_cost(timm.create_model("vit_small_patch16_224", **ARCH))
    # per layer: one more MLP pass per token (K=2) plus the router 2*T*D*E
    assert cost.flops - dense.flops == 2 * (2 * 17 * 2 * 32 * 128 + 2 * 17 * 32 * 4)
    per_expert = 2 * 32 * 128 + 128 + 32
    assert cost.params - dense.params == 2 * (3 * per_expert + 4 * 32)
    assert cost.params - cost.active_params == 2 * 2 * per_expert  # E - K = 2 experts idle per token


def test_structured_moe_count_matches_flop_counter():
    """Fine-grained + shared experts + a residual MLP with learned coefficients (every token runs those)."""
    model = create_vmoe("vit_small_patch16_224", moe_layers="last-1", num_experts=4, k=2, capacity_factor=8.0,
                        moe_kwargs={"expert_granularity": 2, "num_shared_experts": 1, "residual": True,
                                    "residual_coefficient": True}, **ARCH).eval()
    with torch.no_grad():
        flops = counted_flops(model, torch.randn(1, 3, 16, 16))
    assert model_cost(model).flops == flops


def test_main_prints_table(capsys):
    main(["--backbone", "vit_tiny_patch16_224", "--img_size", "32", "--num_experts", "4", "--k", "1",
          "--moe_layers", "last-2"])
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224" in out and "V-MoE E4 K1 last-2" in out and "GFLOPs/img" in out


def test_expert_choice_counts_its_real_choices_per_token():
    """E=4, c=2, one image of T=17 tokens per group: each expert takes C = ceil(17 * 2 / 4) = 9 tokens, so
    36 expert passes for 17 tokens (36/17 per token), not E=4 per token (its formal k)."""
    from vmoe.models.flops import choices_per_token
    model = create_vmoe("vit_small_patch16_224", moe_layers="every-1", num_experts=4, router="expert_choice",
                        **ARCH).eval()
    layer = model.blocks[0].mlp
    assert layer.k == 4 and choices_per_token(layer, 17) == 36 / 17
    cost = model_cost(model)
    dense = model_cost(timm.create_model("vit_small_patch16_224", **ARCH))
    mlp = 2 * (32 * 128 + 128 * 32)  # one expert pass of one token
    assert cost.flops - dense.flops == 2 * ((36 - 17) * mlp + 2 * 17 * 32 * 4)  # 36 passes instead of 17, router
    assert cost.experts_per_token == 36 / 17
    per_expert = 2 * 32 * 128 + 128 + 32
    assert cost.params - cost.active_params == 2 * round((4 - 36 / 17) * per_expert)
    with torch.no_grad():
        assert counted_flops(model, torch.randn(1, 3, 16, 16)) == cost.flops


def test_dense_moe_uses_every_expert_unless_capacity_is_short():
    from vmoe.models.flops import choices_per_token
    model = create_vmoe("vit_small_patch16_224", moe_layers="every-1", num_experts=4, router="dense", **ARCH).eval()
    assert choices_per_token(model.blocks[0].mlp, 17) == 4  # C = 20 slots per expert >= 17 tokens
    with torch.no_grad():
        assert counted_flops(model, torch.randn(1, 3, 16, 16)) == model_cost(model).flops
    short = create_vmoe("vit_small_patch16_224", moe_layers="every-1", num_experts=4, router="dense",
                        capacity_factor=0.25, **ARCH).eval()
    # C = ceil(17 * 4 * 0.25 / 4) = 5 -> 8 (multiple of 4): at most 4 * 8 = 32 of the 68 assignments run
    assert choices_per_token(short.blocks[0].mlp, 17) == 32 / 17


def test_main_reports_expert_choice_per_token(capsys):
    main(["--backbone", "vit_tiny_patch16_224", "--img_size", "32", "--num_experts", "4", "--router",
          "expert_choice", "--moe_layers", "last-1"])
    out = capsys.readouterr().out
    # 4 patches + CLS = 5 tokens, C = ceil(5 * 2 / 4) = 3: 12 passes for 5 tokens = 2.4 per token
    assert "V-MoE E4 expert_choice last-1" in out and " 2.4 " in out


def test_options_are_not_abbreviated(capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["--backbone", "vit_tiny_patch16_224", "--num_expert", "4"])
    assert "--num_expert" in capsys.readouterr().err


def test_soft_moe_count_matches_flop_counter_and_main(capsys):
    """Soft MoE, E=4, p=2, one image of T=17 tokens: the experts run 8 slots (8/17 passes per token) and
    the mixing costs three T x D x E*p products (logits, dispatch; combine is T x E*p x D_out)."""
    from vmoe.models.flops import choices_per_token
    model = create_vmoe("vit_small_patch16_224", moe_layers="every-1", num_experts=4, router="soft",
                        moe_kwargs={"router_kwargs": {"slots_per_expert": 2}}, **ARCH).eval()
    assert choices_per_token(model.blocks[0].mlp, 17) == 8 / 17
    cost = model_cost(model)
    dense = model_cost(timm.create_model("vit_small_patch16_224", **ARCH))
    mlp = 2 * (32 * 128 + 128 * 32)  # one expert pass of one token
    assert cost.flops - dense.flops == 2 * ((8 - 17) * mlp + 3 * 2 * 17 * 32 * 8)
    assert cost.active_params == cost.params and cost.experts_per_token == 8 / 17  # every expert reaches every token
    with torch.no_grad():
        assert counted_flops(model, torch.randn(1, 3, 16, 16)) == cost.flops
    main(["--backbone", "vit_tiny_patch16_224", "--img_size", "32", "--num_experts", "4", "--router", "soft",
          "--moe_layers", "last-1"])
    # 4 patches + CLS = 5 tokens, 4 slots: 0.8 expert passes per token
    out = capsys.readouterr().out
    assert "V-MoE E4 soft last-1" in out and " 0.8 " in out


def config_table(tmp_path, router_lines: str) -> str:
    """vmoe flops --config's table for a tiny digits-sized config with the given router lines."""
    from vmoe.train.flops_cli import config_cost_table
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model:\n  backbone: vit_tiny_patch16_224\n  model_kwargs: {patch_size: 4, embed_dim: 32, depth: 2,"
                   " num_heads: 2}\n  img_size: 16\n  num_classes: 10\n  moe_layers: every-2\n  num_experts: 4\n"
                   + router_lines)
    return config_cost_table([str(cfg)])


def test_config_table_of_a_soft_moe_config(tmp_path):
    table = config_table(tmp_path, "  router: soft\n")
    assert "V-MoE E4 soft every-2" in table and " 0.235 " in table  # 4 slots for 17 tokens


def test_config_table_names_expert_choice_by_its_scheme(tmp_path):
    table = config_table(tmp_path, "  router: expert_choice\n  k: null\n")
    assert "V-MoE E4 expert_choice every-2" in table and " K4 " not in table
