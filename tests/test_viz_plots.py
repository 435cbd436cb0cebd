"""Routing pictures: what each figure draws matches the captured routing; everything renders headless."""
import io

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from timm.models.vision_transformer import VisionTransformer

from vmoe.models import routing_settings
from vmoe.moe import MoEMlp, SoftMoEMlp
from vmoe.viz import (DROPPED, PARTIAL, capacity_sweep, collect_routing_stats, display_images, format_sweep_table,
                      loads_and_capacity, mcnemar_p_value, patch_layout, patch_status, plot_capacity_sweep,
                      plot_class_expert_share, plot_dropped_patches, plot_expert_load, plot_expert_map, route,
                      routing_figures, top1_expert_map, wilson_interval)
from vmoe.viz.collect import layer_capacity
from vmoe.viz.report import dropped_patches_note
from vmoe.viz.plots import DROP_COLOR, PARTIAL_HATCH


def tiny_vmoe(num_experts=4):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=2,
                              num_heads=2)
    model.blocks[1].mlp = MoEMlp(32, 64, num_experts=num_experts, k=2, capacity_factor=1.0)
    with torch.no_grad():  # a spread-out router so that experts really differ in load
        model.blocks[1].mlp.router.weight.normal_(0, 1.0)
    return model.eval()


def marks(ax):
    """(# cells filled as 'lost every choice', # cells outlined as 'lost some') drawn on one panel."""
    dropped = sum(1 for p in ax.patches if p.get_hatch() is None and p.get_facecolor()[:3] == to_rgba(DROP_COLOR)[:3])
    partial = sum(1 for p in ax.patches if p.get_hatch() == PARTIAL_HATCH)
    return dropped, partial


def test_marked_patches_equal_the_captured_routing():
    model = tiny_vmoe()
    images = torch.randn(3, 1, 16, 16)
    grid, prefix = patch_layout(model)
    assert grid == (4, 4) and prefix == 1
    status, truth = {}, {}
    for mode, bpr in (("vanilla", False), ("bpr", True)):
        _, routings = route(model, images, eval_capacity_factor=0.3, batch_priority=bpr)
        kept = routings[1].kept[:, prefix:]  # [B, 16, K], counted straight from the routing
        truth[mode] = ((~kept.any(-1)).sum(1).tolist(), (kept.any(-1) & ~kept.all(-1)).sum(1).tolist())
        status[mode] = {1: patch_status(routings[1], grid, prefix)}
        assert (status[mode][1] == DROPPED).sum(axis=(1, 2)).tolist() == truth[mode][0]
        assert (status[mode][1] == PARTIAL).sum(axis=(1, 2)).tolist() == truth[mode][1]
    assert sum(truth["vanilla"][0]) > 0 and sum(truth["bpr"][1]) > 0  # the test has drops of both kinds
    fig = plot_dropped_patches(display_images(images), status, capacity_factor=0.3)
    axes = np.array(fig.axes).reshape(3, 3)  # rows: images; columns: input, block 1 vanilla, block 1 BPR
    for i in range(3):
        assert marks(axes[i, 0]) == (0, 0)
        for j, mode in ((1, "vanilla"), (2, "bpr")):
            assert marks(axes[i, j]) == (truth[mode][0][i], truth[mode][1][i])
    assert axes[0, 1].get_title() == "block 1\nvanilla" and axes[0, 2].get_title() == "block 1\nBPR"
    fig.savefig(io.BytesIO(), format="png")


def test_routing_settings_restore_and_route_does_not_leak():
    model = tiny_vmoe()
    layer = model.blocks[1].mlp
    before = layer.settings
    with routing_settings(model, eval_capacity_factor=0.25, batch_priority=True):
        assert layer.settings.eval_capacity_factor == 0.25 and layer.settings.batch_priority
    assert layer.settings == before and before.eval_capacity_factor == 1.0 and not before.batch_priority
    model.train()
    route(model, torch.randn(2, 1, 16, 16), eval_capacity_factor=0.5)
    assert model.training and layer.settings == before


def test_expert_map_and_load_draw_the_routing():
    model = tiny_vmoe()
    images = torch.randn(2, 1, 16, 16)
    _, routings = route(model, images, eval_capacity_factor=0.5)
    emap = top1_expert_map(routings[1], (4, 4), 1)
    fig = plot_expert_map(display_images(images), emap, 4, block=1)
    overlay = fig.axes[3].images[-1].get_array()  # second image's colour grid
    np.testing.assert_array_equal(np.asarray(overlay), emap[1])
    assert [t.get_text() for t in fig.axes[3].texts] == [str(v) for v in emap[1].reshape(-1)]
    loads, capacity = loads_and_capacity(model, routings, eval_capacity_factor=0.5)
    # 2 images x 17 tokens x K=2 = 68 choices over 4 experts at 0.5 -> ceil(8.5)=9 -> multiple of 4: 12
    assert capacity == {1: 12}
    kept, dropped = loads[1]
    assert kept.sum(0).max() <= 12 and kept.sum() + dropped.sum() == 68
    fig = plot_expert_load(loads, capacity)
    ax = fig.axes[0]
    heights = np.array([b.get_height() for b in ax.patches]).reshape(3, 4)  # rank 1, rank 2, dropped
    np.testing.assert_array_equal(heights, np.vstack([kept, dropped.sum(0)]))
    assert ax.lines[0].get_ydata()[0] == 12
    fig.savefig(io.BytesIO(), format="png")


def test_class_share_and_sweep_plots():
    counts = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    fig = plot_class_expert_share(counts, ["a", "b", "c"], block=3)
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()),
                               [[75, 25, 0], [0, 0, 0], [25, 25, 50]])
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        plot_class_expert_share(counts, ["a", "b"], block=3)
    rows = [dict(capacity_factor=c, mode=m, accuracy=a, dropped_tokens=d, num_images=20)
            for c, m, a, d in [(0.5, "vanilla", .5, .3), (0.5, "bpr", .7, .3), (1.0, "vanilla", .8, .1),
                               (1.0, "bpr", .85, .1)]]
    fig = plot_capacity_sweep(rows)
    acc_ax = fig.axes[0]
    assert [tuple(line.get_ydata()) for line in acc_ax.lines if line.get_label() in ("vanilla", "BPR")] == [
        (50, 80), (70, 85)]
    # one error bar per point: the 95% Wilson interval of 10/20 images right is 29.9% - 70.1%
    segments = [seg for coll in acc_ax.collections for seg in coll.get_segments()]
    assert len(segments) == 4
    np.testing.assert_allclose(sorted(segments, key=lambda s: (s[0][0], s[0][1]))[0][:, 1],
                               [29.93, 70.07], atol=0.01)
    low, high = acc_ax.get_ylim()
    assert acc_ax.get_title() == (f"axis {low:.1f}-{high:.1f}% (zoomed, not from 0)\nbars: 95% binomial (Wilson) "
                                  "interval, n = 20 images")
    assert fig.axes[1].get_ylim()[0] == 0
    fig.savefig(io.BytesIO(), format="png")
    no_counts = plot_capacity_sweep([{k: v for k, v in r.items() if k != "num_images"} for r in rows])
    assert not no_counts.axes[0].collections and "no intervals" in no_counts.axes[0].get_title()


def test_wilson_interval_matches_scipy_and_hand_values():
    from scipy.stats import binomtest

    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(0, 10)[1] == pytest.approx(1.96**2 / (10 + 1.96**2))
    for k, n in [(5, 10), (9_086, 10_000), (270, 270), (1, 3)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=2e-4)
    with pytest.raises(ValueError, match="successes=11, n=10"):
        wilson_interval(11, 10)


def test_mcnemar_p_value_hand_computed():
    # n = 5 disagreements, all one way: 2 * P(X <= 0) = 2 / 32
    assert mcnemar_p_value(0, 5) == mcnemar_p_value(5, 0) == 2 / 32
    assert mcnemar_p_value(3, 0) == 2 / 8
    # 2 * P(X <= 1) for n = 6: 2 * (1 + 6) / 64
    assert mcnemar_p_value(1, 5) == 14 / 64
    assert mcnemar_p_value(1, 1) == 1.0 and mcnemar_p_value(0, 0) == 1.0  # capped; no disagreement
    with pytest.raises(ValueError, match="counts must be >= 0"):
        mcnemar_p_value(-1, 2)


def test_capacity_sweep_and_table():
    model = tiny_vmoe()
    data = [(torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4,))) for _ in range(2)]
    rows = capacity_sweep(model, data, capacity_factors=[0.25, 4.0])
    assert [(r["capacity_factor"], r["mode"]) for r in rows] == [(0.25, "vanilla"), (0.25, "bpr"),
                                                                (4.0, "vanilla"), (4.0, "bpr")]
    assert all(r["num_images"] == 8 for r in rows)
    assert rows[0]["dropped_assignments"] > 0.4 and rows[2]["dropped_tokens"] == 0.0
    # At a capacity where nothing drops, routing mode cannot change the prediction.
    assert rows[2]["accuracy"] == rows[3]["accuracy"]
    for factor_rows in (rows[:2], rows[2:]):
        vanilla, bpr = factor_rows
        # only_correct counts disagreements, so it ties the two accuracies together exactly
        assert round((bpr["accuracy"] - vanilla["accuracy"]) * 8) == bpr["only_correct"] - vanilla["only_correct"]
        assert vanilla["p_value"] == bpr["p_value"] == mcnemar_p_value(vanilla["only_correct"], bpr["only_correct"])
    assert rows[2]["only_correct"] == rows[3]["only_correct"] == 0 and rows[2]["p_value"] == 1.0
    table = format_sweep_table(rows)
    assert "0.25" in table and "BPR acc" in table and "McNemar" in table and len(table.splitlines()) == 5
    single = capacity_sweep(model, data, capacity_factors=[0.25], modes=["bpr"])
    assert single[0]["p_value"] is None and "McNemar" not in format_sweep_table(single)
    with pytest.raises(ValueError, match="must be > 0"):
        capacity_sweep(model, data, capacity_factors=[0.0])
    with pytest.raises(ValueError, match="unknown routing modes"):
        capacity_sweep(model, data, modes=["greedy"])


def test_routing_figures_names():
    model = tiny_vmoe()
    images, labels = torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    batches = [(images, labels), (torch.randn(4, 1, 16, 16), torch.tensor([1, 1, 0, 2]))]
    stats = collect_routing_stats(model, batches, num_classes=3)
    assert (stats.num_batches, stats.num_images) == (2, 6)
    # capacity at the model's factor 1.0: 2*17*2/4 = 17 -> 20 slots; 4*17*2/4 = 34 -> 36 slots
    assert stats.capacity == {1: 56}
    assert stats.class_counts[1].sum(1).tolist() == [2 * 16 * 2, 2 * 16 * 2, 2 * 16 * 2]  # patches x K per class
    loads, capacity = stats.mean_loads()
    assert capacity == {1: 28.0} and loads[1][0].sum() + loads[1][1].sum() == (2 + 4) * 17 * 2 / 2
    figs = routing_figures(model, images, labels, mean=[0.5], std=[0.25], capacity_factors=[0.5, 1.0],
                           stats=stats, class_names=["x", "y", "z"])
    assert sorted(figs) == ["class_expert_block1", "dropped_patches_cf0.5", "dropped_patches_cf1", "expert_load",
                            "expert_map_block1"]
    assert np.array(figs["dropped_patches_cf1"].axes).reshape(2, 3)[1, 0].get_ylabel() == "z"


def test_dense_model_is_rejected():
    dense = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="no MoE layers"):
        route(dense, torch.randn(1, 1, 16, 16))


def tiny_soft_vmoe(mixed=False):
    """Soft MoE in block 1; with ``mixed`` also a top-k MoEMlp in block 0 (a hand-built mixed model)."""
    model = tiny_vmoe()
    torch.manual_seed(1)
    if mixed:
        model.blocks[0].mlp = model.blocks[1].mlp
    model.blocks[1].mlp = SoftMoEMlp(32, 64, num_experts=4)
    with torch.no_grad():  # spread-out slot logits, so that several experts dominate somewhere
        model.blocks[1].mlp.phi.normal_(0, 3.0)
    return model.eval()


def test_soft_moe_pictures_have_no_capacity_and_no_drops():
    model = tiny_soft_vmoe()
    images, labels = torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    stats = collect_routing_stats(model, [(images, labels), (torch.randn(3, 1, 16, 16), torch.tensor([1, 1, 0]))],
                                  num_classes=3)
    assert stats.capacity == {1: None} and stats.dropped[1].sum() == 0
    assert stats.kept[1].shape == (1, 4) and stats.kept[1].sum() == 5 * 17  # one dominant expert per token
    assert stats.class_counts[1].sum(1).tolist() == [2 * 16, 2 * 16, 16]
    figs = routing_figures(model, images, labels, stats=stats)  # no capacity factor asked: none drawn
    assert sorted(figs) == ["class_expert_block1", "expert_load", "expert_map_block1"]
    _, routings = route(model, images)
    emap = top1_expert_map(routings[1], (4, 4), 1)
    assert len(np.unique(emap)) > 1
    np.testing.assert_array_equal(np.asarray(figs["expert_map_block1"].axes[2].images[-1].get_array()), emap[0])
    assert "dominant expert" in figs["expert_map_block1"]._suptitle.get_text()
    load = figs["expert_load"]
    assert not load.axes[0].lines and "nothing dropped" in load.axes[0].get_title()  # no capacity line
    assert "Soft MoE: no capacity, nothing dropped" in load._suptitle.get_text()
    np.testing.assert_array_equal([b.get_height() for b in load.axes[0].patches], stats.kept[1][0] / 2)
    assert dropped_patches_note(model) == ("no dropped-patch pictures: MoE block [1] (SoftMoEMlp) has no capacity: "
                                           "Soft MoE mixes tokens into slots and drops nothing")
    with pytest.raises(ValueError, match=r"capacity factors \[0.5\] were given, but MoE block \[1\] \(SoftMoEMlp\) "
                                         "has no capacity"):
        routing_figures(model, images, labels, capacity_factors=[0.5])
    with pytest.raises(ValueError, match=r"eval_capacity_factor=0.5.*MoE block \[1\] \(SoftMoEMlp\) has no capacity"):
        route(model, images, eval_capacity_factor=0.5)
    with pytest.raises(ValueError, match=r"no capacity to sweep: MoE block \[1\] \(SoftMoEMlp\)"):
        capacity_sweep(model, [(images, labels)], capacity_factors=[0.5])
    for fig in figs.values():
        fig.savefig(io.BytesIO(), format="png")


def test_mixed_soft_and_top_k_blocks_are_handled_per_block():
    model = tiny_soft_vmoe(mixed=True)
    topk = model.blocks[0].mlp
    images, labels = torch.randn(3, 1, 16, 16), torch.tensor([0, 2, 1])
    _, routings = route(model, images, eval_capacity_factor=0.3, batch_priority=True)  # acts on block 0 only
    assert routings[0].kept.float().mean() < 1 and routings[1].kept.all() and routings[1].expert_index.shape[-1] == 1
    assert topk.settings.eval_capacity_factor == 1.0 and not topk.settings.batch_priority  # put back
    loads, capacity = loads_and_capacity(model, routings, eval_capacity_factor=0.3)
    # 3 images x 17 tokens x K=2 = 102 choices over 4 experts at 0.3 -> ceil(7.65) = 8 slots (a multiple of 4)
    assert capacity == {0: 8, 1: None} and loads[1][0].sum() == 51 and loads[1][1].sum() == 0
    stats = collect_routing_stats(model, [(images, labels)], num_classes=3)
    assert stats.capacity == {0: layer_capacity(topk, 3, 17), 1: None}
    figs = routing_figures(model, images, labels, capacity_factors=[0.3], stats=stats)
    assert sorted(figs) == ["class_expert_block0", "class_expert_block1", "dropped_patches_cf0.3", "expert_load",
                            "expert_map_block0", "expert_map_block1"]
    titles = [ax.get_title() for ax in figs["dropped_patches_cf0.3"].axes[:3]]
    assert titles == ["input", "block 0\nvanilla", "block 0\nBPR"]  # the soft block has no dropped-patch panel
    load_axes = figs["expert_load"].axes
    assert len(load_axes[0].lines) == 1 and not load_axes[1].lines
    assert "blocks [1]: Soft MoE" in figs["expert_load"]._suptitle.get_text()
    assert dropped_patches_note(model).startswith("dropped-patch pictures show blocks [0] only: MoE block [1]")
    # The sweep changes block 0 only and counts its drops only (the soft block drops nothing, at any factor).
    data = [(images, labels)]
    rows = capacity_sweep(model, data, capacity_factors=[0.3], modes=["vanilla"])
    _, routed = route(model, images, eval_capacity_factor=0.3, batch_priority=False)
    assert rows[0]["dropped_assignments"] == int((~routed[0].kept).sum()) / routed[0].kept.numel() > 0
