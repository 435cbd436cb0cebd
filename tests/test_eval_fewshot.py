"""Few-shot linear evaluation: the ridge solver on hand-made features, seeded draws, L2 choice, the table."""
import pytest
import torch

from vmoe.eval import draw_shots, fewshot_evaluate, format_fewshot_table, pm1_targets, ridge_fit, ridge_predict, select_l2


def test_pm1_targets():
    t = pm1_targets(torch.tensor([2, 0]), 3)
    assert t.tolist() == [[-1, -1, 1], [1, -1, -1]]
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pm1_targets(torch.tensor([3]), 3)


def test_ridge_fit_hand_computed_one_feature():
    # x = [1, -1], bias column 1: X = [[1, 1], [-1, 1]], X^T X = 2 I, X^T y = [2, 0] for y = [1, -1].
    # (2 + l2) w = [2, 0] -> w = [2 / (2 + l2), 0]; l2 = 2 -> [0.5, 0].
    x, y = torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [-1.0]])
    w = ridge_fit(x, y, 2.0)
    assert torch.allclose(w, torch.tensor([[0.5], [0.0]], dtype=torch.float64))
    assert torch.allclose(ridge_predict(w, torch.tensor([[4.0]])), torch.tensor([[2.0]], dtype=torch.float64))


def test_ridge_fit_primal_and_dual_forms_agree_and_small_l2_interpolates():
    torch.manual_seed(0)
    x, y = torch.randn(5, 12), pm1_targets(torch.tensor([0, 1, 2, 0, 1]), 3)  # N=5 < D+1: dual form
    w_dual = ridge_fit(x, y, 0.3)
    xb = torch.cat([x.double(), torch.ones(5, 1, dtype=torch.float64)], 1)
    w_primal = torch.linalg.solve(xb.T @ xb + 0.3 * torch.eye(13, dtype=torch.float64), xb.T @ y)
    assert torch.allclose(w_dual, w_primal, atol=1e-10)
    assert torch.allclose(ridge_predict(ridge_fit(x, y, 1e-9), x), y, atol=1e-5)  # fits the 5 targets exactly
    with pytest.raises(ValueError, match="l2 must be > 0"):
        ridge_fit(x, y, 0.0)


def test_draw_shots_is_seeded_per_class_and_reports_short_classes():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2])
    a = draw_shots(labels, 2, 2, torch.Generator().manual_seed(3))
    b = draw_shots(labels, 2, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and labels[a].tolist() == [0, 0, 1, 1] and len(set(a.tolist())) == 4
    with pytest.raises(ValueError, match=r"classes \{2: 1\}"):
        draw_shots(labels, 2, 3, torch.Generator().manual_seed(0))


def _separable(n_per_class, seed, noise=0.1):
    # class c sits at e_c in 4-d, plus noise: a linear map separates the classes.
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(n_per_class)
    x = torch.eye(4)[labels] + noise * torch.randn(len(labels), 4, generator=g)
    return x, labels


def test_fewshot_evaluate_separable_features_reach_full_accuracy():
    pool_x, pool_y = _separable(30, 0)
    test_x, test_y = _separable(50, 1)
    rows = fewshot_evaluate(pool_x, pool_y, test_x, test_y, 4, shots=[1, 5], seed=0)
    assert [r["shots"] for r in rows] == [1, 5]
    assert all(r["accuracy"] == 1.0 and r["num_test"] == 200 for r in rows)
    assert rows[1]["num_holdout"] == 120 - 20
    assert rows == fewshot_evaluate(pool_x, pool_y, test_x, test_y, 4, shots=[1, 5], seed=0)  # reproducible
    assert format_fewshot_table(rows).splitlines()[1].startswith("5-shot  1.000")


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(0)
    pool_x, test_x = torch.randn(200, 8, generator=g), torch.randn(400, 8, generator=g)
    pool_y, test_y = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (400,), generator=g)
    (row,) = fewshot_evaluate(pool_x, pool_y, test_x, test_y, 4, shots=[10])
    assert row["accuracy"] < 0.4  # chance is 0.25


def test_select_l2_takes_the_best_held_out_accuracy_ties_to_the_larger_strength():
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(6, 3, generator=g)
    x, hx = torch.randn(9, 6, generator=g), torch.randn(300, 6, generator=g)
    y = (x @ w_true + 1.5 * torch.randn(9, 3, generator=g)).argmax(-1)  # noisy labels: the strength matters
    hy = (hx @ w_true).argmax(-1)
    grid = [1e-4, 1e-2, 1.0, 10.0, 1e2, 1e4]
    accs = {l2: float((ridge_predict(ridge_fit(x, pm1_targets(y, 3), l2), hx).argmax(-1) == hy).double().mean())
            for l2 in grid}
    assert len(set(accs.values())) > 1  # the choice is not trivial
    l2, acc = select_l2(x, y, hx, hy, 3, grid)
    assert acc == max(accs.values()) and l2 == max(v for v in grid if accs[v] == acc)
    with pytest.raises(ValueError, match="empty"):
        select_l2(x, y, hx, hy, 3, [])


def test_features_of_a_tiny_vit_and_callback_arguments():
    import timm

    from vmoe.eval.callback import FewShotEvaluation
    from vmoe.eval.features import dataset_labels, extract_features, select_pool
    from vmoe.train.data import TensorImageDataset

    net = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                            num_classes=3, in_chans=1).train()
    images, labels = torch.randn(10, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    ds = TensorImageDataset(images, labels)
    feats, got = extract_features(net, ds, indices=[1, 3, 4], batch_size=2)
    assert feats.shape == (3, 32) and got.tolist() == [1, 0, 1] and net.training  # mode restored
    with torch.no_grad():
        expected = net.eval().forward_head(net.forward_features(images[[1, 3, 4]]), pre_logits=True)
    assert torch.allclose(feats, expected, atol=1e-6)
    assert torch.equal(dataset_labels(torch.utils.data.Subset(ds, [9, 0])), torch.tensor([2, 0]))
    pool = select_pool(labels, 2, seed=0)
    assert sorted(labels[pool].tolist()) == [0, 0, 1, 1, 2, 2] and torch.equal(pool, select_pool(labels, 2, seed=0))
    with pytest.raises(ValueError, match="pool must be"):
        FewShotEvaluation(pool="test", split="test")
    with pytest.raises(ValueError, match="every_n_epochs"):
        FewShotEvaluation(every_n_epochs=0)
