"""Few-shot linear evaluation as the V-MoE paper computes it (Sec. 3 / App. B): the solver, the shot draws and
the choice of the L2 strength. Pure functions: features in, accuracies out.

Shapes: N few-shot training images, M evaluated images, D feature width, L classes, G L2 values of a grid.

The solver (the reference's, google-research/vmoe ``vmoe/evaluate/fewshot.py``): every feature dimension is
standardised with the mean and standard deviation (+1e-5) of the N training images (the evaluated images get the
same transform); a constant column of 100 is appended, so the bias is hardly regularised; targets are one-hot
rescaled to ±1; W minimises ||X W - Y||^2 + l2 ||W||^2 in closed form; the class is the argmax of X W.
Everything runs in float64.

Shots: for each class, one seeded permutation of its images; the n-shot set is the first n of every class, so
the 1-shot set lies inside the 5-shot set, and so on (one draw serves every shot count).

L2 choice (the reference's): per shot count, the grid value with the best mean rank of accuracy across every
(dataset, seed) evaluated together; it looks at the labels of the evaluated split.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BIAS_COLUMN", "REFERENCE_L2_GRID", "LinearProbe", "linear_probe_accuracy", "linear_probe_accuracies",
           "shot_draw", "reference_shot_seed", "mean_rank_choice", "check_num_classes", "check_l2_grid"]

BIAS_COLUMN = 100.0  # the value of the constant feature that carries the bias
REFERENCE_L2_GRID = tuple(2.0 ** k for k in range(-10, 20))  # 2^-10 ... 2^19, the reference's common_fewshot


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` as an int; raises ValueError below 2 (one class is always "right": accuracy 1.0 says
    nothing about the features)."""
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"few-shot evaluation needs at least 2 classes, got num_classes={num_classes!r} (with one "
                         "class every prediction is right and the accuracy is meaningless)")
    return int(num_classes)


def _check_features(name: str, x: Tensor, y: Tensor, num_classes: int) -> None:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: expected features [N, D] and labels [N] with N >= 1, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{name}: labels must be in [0, {num_classes - 1}], got values in [{int(y.min())}, "
                         f"{int(y.max())}]")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: the features hold NaN or inf ({int((~torch.isfinite(x)).sum())} values)")


class LinearProbe:
    """The reference's ridge probe fitted once on (train_x [N, D], train_y [N]); ``accuracies`` evaluates it at
    every L2 of a grid from one eigendecomposition (of X^T X [D+1, D+1] when N >= D+1, else of X X^T [N, N])."""

    def __init__(self, train_x: Tensor, train_y: Tensor, num_classes: int) -> None:
        num_classes = check_num_classes(num_classes)
        _check_features("few-shot training set", train_x, train_y, num_classes)
        x = train_x.double()
        self.num_classes = num_classes
        self.mean = x.mean(0)
        self.std = x.std(0, unbiased=False) + 1e-5
        x = self._design(x)
        targets = torch.nn.functional.one_hot(train_y.long(), num_classes).to(x) * 2 - 1  # [N, L], ±1
        # With X X^T = U diag(e) U^T (dual) or X^T X = V diag(e) V^T (primal), the ridge weights are
        # W = A diag(1 / (e + l2)) B for fixed A [D+1, r] and B [r, L]; only the diagonal depends on l2.
        if x.shape[0] >= x.shape[1]:
            self.eigs, vecs = torch.linalg.eigh(x.T @ x)
            self.left, self.right = vecs, vecs.T @ (x.T @ targets)
        else:
            self.eigs, vecs = torch.linalg.eigh(x @ x.T)
            self.left, self.right = x.T @ vecs, vecs.T @ targets

    def _design(self, x: Tensor) -> Tensor:
        """Standardised features with the bias column: [N, D] -> [N, D+1] float64."""
        x = (x.double().to(self.mean.device) - self.mean) / self.std
        return torch.cat([x, x.new_full((x.shape[0], 1), BIAS_COLUMN)], dim=1)

    def correct(self, x: Tensor, y: Tensor, l2_grid: Sequence[float]) -> Tensor:
        """Correct predictions [G] (int64) on x [M, D], y [M] at every L2 of the grid."""
        _check_features("evaluated set", x, y, self.num_classes)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"evaluated features have width {x.shape[1]}, the training features {self.mean.shape[0]}")
        l2 = check_l2_grid(l2_grid).to(self.eigs)
        projected = self._design(x) @ self.left  # [M, r]
        y = y.to(projected.device).long()
        # several L2 values per batched product (few large ops, not G small ones), ~4M float64 values at a time
        step = max(1, 4_000_000 // projected.numel())
        counts = []
        for chunk in l2.split(step):
            scores = (projected / (self.eigs + chunk[:, None])[:, None, :]) @ self.right  # [g, M, L]
            counts.append(scores.argmax(-1).eq(y).sum(-1).cpu())
        return torch.cat(counts)

    def accuracies(self, x: Tensor, y: Tensor, l2_grid: Sequence[float]) -> list[float]:
        """Accuracy at every L2 of the grid (float64 Python floats, correct / M)."""
        return [c / x.shape[0] for c in self.correct(x, y, l2_grid).tolist()]


def check_l2_grid(l2_grid: Sequence[float]) -> Tensor:
    values = [float(v) for v in l2_grid]
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"the L2 grid must be a non-empty list of finite values > 0, got {list(l2_grid)}")
    return torch.tensor(values, dtype=torch.float64)


def linear_probe_accuracies(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                            l2_grid: Sequence[float], num_classes: int) -> list[float]:
    """Test accuracy of the reference's ridge probe at every L2 of ``l2_grid`` (one fit, one eigendecomposition).

    train_x [N, D], train_y [N], test_x [M, D], test_y [M]; labels in [0, num_classes).
    """
    return LinearProbe(train_x, train_y, num_classes).accuracies(test_x, test_y, l2_grid)


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, l2: float,
                          num_classes: int) -> float:
    """Test accuracy (float64) of the reference's ridge probe at one L2 strength: standardise with the training
    set's mean / std + 1e-5, bias column 100, ±1 targets, closed form. Shapes as ``linear_probe_accuracies``."""
    return linear_probe_accuracies(train_x, train_y, test_x, test_y, [l2], num_classes)[0]


def reference_shot_seed(seed: int, index: int) -> int:
    """The NumPy seed of shot draw ``index`` (0, 1, ...) under ``seed``, as the reference derives it (so the
    draws are the reference's): Python's hash of the pair, modulo 2^31. Deterministic (ints hash to
    themselves and tuples hash by value), not salted by PYTHONHASHSEED."""
    return hash((int(seed), int(index))) % 2 ** 31


def shot_draw(labels: Tensor, num_classes: int, per_class: int, seed: int) -> Tensor:
    """Indices [L, per_class] into ``labels``: row c holds the first ``per_class`` images of class c after a
    permutation of all of them drawn with ``np.random.default_rng(seed)`` (classes in order 0, 1, ...: the
    reference's draw). The n-shot training set is ``draw[:, :n].flatten()``: nested prefixes.

    Raises ValueError below 2 classes and naming the classes with fewer than ``per_class`` images.
    """
    num_classes = check_num_classes(num_classes)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels = labels.detach().cpu().numpy()
    rng = np.random.default_rng(int(seed))
    rows, short = [], {}
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        if members.size < per_class:
            short[c] = int(members.size)
        rows.append(members[:per_class])
    if short:
        raise ValueError(f"{per_class} images of every class are needed; the pool has fewer for classes {short} "
                         "(class: images). Use fewer shots (or a smaller held-out set) or a larger pool.")
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks [R, G] of every row of values [R, G]: 0 for the smallest; tied values share their average rank."""
    less = (values.unsqueeze(-1) > values.unsqueeze(-2)).sum(-1)
    equal = (values.unsqueeze(-1) == values.unsqueeze(-2)).sum(-1)
    return less.double() + (equal.double() - 1) / 2


def mean_rank_choice(accuracies: Tensor | Sequence[Sequence[float]]) -> int:
    """Index of the grid value with the best mean rank: accuracies [R, G], one row per (dataset, seed), one
    column per L2 of the grid; each row ranks the grid, the ranks are averaged over the rows, the largest mean
    wins; a tie of means goes to the first column (the smallest L2 of an ascending grid).

    Tied accuracies within a row share their average rank. (The reference ranks with NumPy's unstable
    argsort, which orders ties arbitrarily; on its fixtures both give the same choice.)
    """
    acc = torch.as_tensor(accuracies, dtype=torch.float64)
    if acc.dim() != 2 or acc.shape[0] == 0 or acc.shape[1] == 0:
        raise ValueError(f"expected accuracies [rows, grid] with at least one of each, got shape {tuple(acc.shape)}")
    mean = _average_ranks(acc).mean(0)
    return int(torch.nonzero(mean == mean.max())[0])
