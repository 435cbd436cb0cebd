"""Few-shot linear evaluation: the solver on hand-made features, nested seeded draws, the two L2 choices,
the protocols on tiny tasks, the features of a tiny ViT, the callback's arguments."""
import numpy as np
import pytest
import torch

from vmoe.eval import (FewShotTask, LinearProbe, evaluate_heldout, evaluate_mean_rank, format_fewshot_table,
                       linear_probe_accuracies, linear_probe_accuracy, mean_rank_choice, shot_draw)
from vmoe.eval.protocol import check_protocol, shot_seeds


def _reference_probe_scores(x, y, test_x, l2, num_classes):
    # the solver written out directly: standardise, bias column 100, ±1 targets, primal normal equations
    x, test_x = x.double(), test_x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-5
    design = lambda f: torch.cat([(f - mean) / std, torch.full((f.shape[0], 1), 100.0, dtype=torch.float64)], 1)
    xb, targets = design(x), torch.nn.functional.one_hot(y, num_classes).double() * 2 - 1
    w = torch.linalg.solve(xb.T @ xb + l2 * torch.eye(xb.shape[1], dtype=torch.float64), xb.T @ targets)
    return design(test_x) @ w


@pytest.mark.parametrize("n", [7, 40])  # N < D+1 (dual form) and N > D+1 (primal form)
def test_probe_matches_the_written_out_solver_in_both_forms(n):
    g = torch.Generator().manual_seed(n)
    x = 3.0 + torch.randn(n, 12, generator=g) * torch.linspace(0.1, 5.0, 12)  # not centred, anisotropic
    y = torch.arange(n) % 3
    tx, ty = 3.0 + torch.randn(200, 12, generator=g) * torch.linspace(0.1, 5.0, 12), torch.randint(0, 3, (200,), generator=g)
    for l2 in (1e-3, 1.0, 300.0):
        expected = float((_reference_probe_scores(x, y, tx, l2, 3).argmax(-1) == ty).double().mean())
        assert linear_probe_accuracy(x, y, tx, ty, l2, 3) == expected


def test_standardisation_uses_the_training_set_statistics():
    # one informative feature at a huge offset and scale: standardised, the probe is scale-invariant
    g = torch.Generator().manual_seed(0)
    y, ty = torch.arange(20) % 2, torch.arange(100) % 2
    x, tx = (y.float() + 0.3 * torch.randn(20, generator=g))[:, None], (ty.float() + 0.3 * torch.randn(100, generator=g))[:, None]
    base = linear_probe_accuracies(x, y, tx, ty, [0.1, 10.0], 2)
    assert linear_probe_accuracies(1e3 + 50 * x, y, 1e3 + 50 * tx, ty, [0.1, 10.0], 2) == base
    assert base[0] > 0.8


def test_probe_refuses_bad_input_naming_it():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="at least 2 classes, got num_classes=1"):
        linear_probe_accuracy(x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long), 1.0, 1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        linear_probe_accuracy(x, torch.tensor([0, 1, 2, 0]), x, y, 1.0, 2)
    with pytest.raises(ValueError, match="finite values > 0"):
        linear_probe_accuracy(x, y, x, y, 0.0, 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        linear_probe_accuracy(x, y, x.clone().fill_(float("nan")), y, 1.0, 2)
    with pytest.raises(ValueError, match="width 5"):
        LinearProbe(x, y, 2).accuracies(torch.randn(2, 5), y[:2], [1.0])


def test_shot_draws_are_seeded_nested_and_per_class():
    labels = torch.tensor([0, 1, 2] * 8)
    draw = shot_draw(labels, 3, 6, seed=5)
    assert draw.shape == (3, 6) and torch.equal(draw, shot_draw(labels, 3, 6, seed=5))
    assert all(labels[draw[c]].eq(c).all() for c in range(3)) and draw.unique().numel() == 18
    # a smaller draw with the same seed is the prefix of the larger one: 1 in 5 in 10 ... shots
    assert torch.equal(shot_draw(labels, 3, 2, seed=5), draw[:, :2])
    assert not torch.equal(shot_draw(labels, 3, 6, seed=6), draw)
    # the permutation of each whole class, as numpy draws it
    rng = np.random.default_rng(5)
    assert [rng.permutation(np.flatnonzero(labels.numpy() == c))[:6].tolist() for c in range(3)] == draw.tolist()
    with pytest.raises(ValueError, match=r"classes \{1: 8, 2: 8\}"):
        shot_draw(torch.cat([labels, torch.zeros(3, dtype=torch.long)]), 3, 9, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        shot_draw(labels, 1, 1, seed=0)


def test_mean_rank_choice_on_a_hand_made_table():
    # three (dataset, seed) rows over a grid of 4 L2 values; ranks (0 = worst, ties share the average):
    #   row a: [0.50, 0.60, 0.70, 0.40] -> [1, 2, 3, 0]
    #   row b: [0.90, 0.80, 0.70, 0.60] -> [3, 2, 1, 0]
    #   row c: [0.20, 0.30, 0.30, 0.10] -> [1, 2.5, 2.5, 0]
    # mean ranks [5/3, 6.5/3, 6.5/3, 0]: columns 1 and 2 tie, the first of them wins
    table = [[0.5, 0.6, 0.7, 0.4], [0.9, 0.8, 0.7, 0.6], [0.2, 0.3, 0.3, 0.1]]
    assert mean_rank_choice(table) == 1
    assert mean_rank_choice(table[:2]) == 0  # a, b: [4, 4, 4, 0]/2 -> all tied but the last: the first
    assert mean_rank_choice([[0.1, 0.9, 0.9]]) == 1
    # ranks, not accuracies: one dataset's large margin does not outvote two small ones
    assert mean_rank_choice([[0.10, 0.90], [0.51, 0.50], [0.51, 0.50]]) == 0
    with pytest.raises(ValueError, match="shape"):
        mean_rank_choice([[]])


def _task(num_per_class=30, num_classes=4, seeds=(0, 1), noise=0.3, width=6, seed=0, per_class=12):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(num_classes, width, generator=g)
    pool_y = torch.arange(num_classes).repeat(num_per_class)
    test_y = torch.arange(num_classes).repeat(50)
    pool_x = centres[pool_y] + noise * torch.randn(len(pool_y), width, generator=g)
    test_x = centres[test_y] + noise * torch.randn(len(test_y), width, generator=g)
    draws = torch.stack([shot_draw(pool_y, num_classes, per_class, s) for s in seeds])
    return FewShotTask(pool_x, pool_y, draws, test_x, test_y, num_classes, tuple(seeds))


def test_evaluate_mean_rank_chooses_one_l2_for_all_datasets_and_seeds():
    tasks = {"easy": _task(noise=0.3), "hard": _task(noise=3.0, seed=1)}
    grid = [0.01, 1.0, 100.0, 1e4]
    rows = evaluate_mean_rank(tasks, shots=[5, 1], l2_grid=grid)
    assert [(r["dataset"], r["shots"]) for r in rows] == [("easy", 1), ("hard", 1), ("easy", 5), ("hard", 5)]
    for n in (1, 5):
        pair = [r for r in rows if r["shots"] == n]
        assert pair[0]["l2"] == pair[1]["l2"]  # one L2 per shot count across datasets
        # recompute: 4 rows (2 datasets x 2 seeds) of test accuracies, best mean rank
        table = [linear_probe_accuracies(*t.shots(s, n), t.test_x, t.test_y, grid, 4) for t in tasks.values()
                 for s in range(2)]
        best = mean_rank_choice(table)
        assert pair[0]["l2"] == grid[best]
        assert pair[0]["seed_accuracies"] == [table[0][best], table[1][best]]
        assert pair[1]["accuracy"] == pytest.approx((table[2][best] + table[3][best]) / 2)
    assert rows[0]["accuracy"] > 0.9 and rows[1]["accuracy"] < rows[0]["accuracy"]
    assert "easy  1-shot  " in format_fewshot_table(rows) and "2 dataset(s) x 2 seed(s)" in format_fewshot_table(rows)
    with pytest.raises(ValueError, match="needs 25 drawn images"):
        evaluate_mean_rank(tasks, shots=[25])


def test_evaluate_heldout_never_reads_the_test_labels():
    task = _task(noise=2.0)
    grid = [0.01, 1.0, 100.0, 1e4]
    rows = evaluate_heldout(task, shots=[1, 5], l2_grid=grid)
    shuffled = FewShotTask(task.pool_x, task.pool_y, task.draws, task.test_x, task.test_y[torch.randperm(200)], 4,
                           task.seeds)
    rows_shuffled = evaluate_heldout(shuffled, shots=[1, 5], l2_grid=grid)
    assert [r["l2"] for r in rows] == [r["l2"] for r in rows_shuffled]  # the choice ignores test labels
    assert rows[1]["num_holdout"] == 4 * (12 - 5) and rows[0]["selection"] == "heldout"
    # the choice: best held-out accuracy averaged over the seeds
    held = []
    for s in range(2):
        idx = task.draws[s, :, 5:].flatten()
        held.append(linear_probe_accuracies(*task.shots(s, 1), task.pool_x[idx], task.pool_y[idx], grid, 4))
    mean = np.mean(held, 0)
    assert rows[0]["l2"] == max((m, g) for m, g in zip(mean, grid))[1] and rows[0]["holdout_accuracy"] == max(mean)
    assert "held-out acc" in format_fewshot_table(rows)
    with pytest.raises(ValueError, match="held-out set needs 13"):
        evaluate_heldout(task, shots=[12])


def test_protocol_settings():
    assert check_protocol("mean_rank", None, 1) == 0 and check_protocol("heldout", None, 3) == 20
    with pytest.raises(ValueError, match="holdout_per_class=5 applies to l2_selection='heldout' only"):
        check_protocol("mean_rank", 5, 1)
    with pytest.raises(ValueError, match="one of"):
        check_protocol("test", None, 1)
    with pytest.raises(ValueError, match="num_seeds"):
        check_protocol("heldout", 5, 0)
    assert shot_seeds(0, 2) == (hash((0, 0)) % 2 ** 31, hash((0, 1)) % 2 ** 31) and shot_seeds(0, 1)[0] == 397586535


def test_features_of_a_tiny_vit_and_callback_arguments():
    import timm

    from vmoe.eval.callback import FewShotEvaluation
    from vmoe.eval.features import dataset_labels, draw_pool, extract_features
    from vmoe.train.data import TensorImageDataset

    net = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                            num_classes=3, in_chans=1).train()
    images, labels = torch.randn(10, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    ds = TensorImageDataset(images, labels)
    seen = []
    feats, got = extract_features(net, ds, indices=[1, 3, 4], batch_size=2, advance=seen.append)
    assert feats.shape == (3, 32) and got.tolist() == [1, 0, 1] and net.training and seen == [2, 1]
    with torch.no_grad():
        expected = net.eval().forward_head(net.forward_features(images[[1, 3, 4]]), pre_logits=True)
    assert torch.allclose(feats, expected, atol=1e-6)
    assert torch.equal(dataset_labels(torch.utils.data.Subset(ds, [9, 0])), torch.tensor([2, 0]))
    images_drawn, draws = draw_pool(labels, 3, 2, seeds=[0, 1])
    assert draws.shape == (2, 3, 2) and torch.equal(images_drawn, images_drawn.unique())
    assert torch.equal(images_drawn[draws[1]], shot_draw(labels, 3, 2, 1))  # draws index the drawn images
    with pytest.raises(ValueError, match="pool must be"):
        FewShotEvaluation(pool="test", split="test")
    with pytest.raises(ValueError, match="every_n_epochs"):
        FewShotEvaluation(every_n_epochs=0)
    with pytest.raises(ValueError, match="holdout_per_class=5 applies"):
        FewShotEvaluation(holdout_per_class=5)
    with pytest.raises(ValueError, match="shots must be"):
        FewShotEvaluation(shots=[0])
    assert FewShotEvaluation(l2_selection="heldout").holdout == 20
