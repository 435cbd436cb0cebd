"""Few-shot linear evaluation (V-MoE paper, Sec. 3 / App. B): closed-form L2-regularised least squares from
frozen pre-logits features to ±1 class targets, on n images per class drawn with a seed.

Pure tensor functions: features in, accuracies out. Shapes: N images, D feature width, L classes.
For each shot count n: draw n images per class from the pool (the training split), fit one linear map per
regularisation strength of the grid, keep the strength with the best accuracy on held-out pool images
(pool images not among the n shots), and report the accuracy of that fit on the test features.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_L2_GRID", "pm1_targets", "ridge_fit", "ridge_predict", "draw_shots", "select_l2",
           "fewshot_evaluate", "format_fewshot_table"]

DEFAULT_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def pm1_targets(labels: Tensor, num_classes: int) -> Tensor:
    """labels [N] -> targets [N, L]: +1 at the label, -1 elsewhere (float64)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return torch.nn.functional.one_hot(labels.long(), num_classes).double() * 2 - 1


def _with_bias(x: Tensor) -> Tensor:
    return torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


def ridge_fit(x: Tensor, targets: Tensor, l2: float) -> Tensor:
    """W [D+1, L] minimising ||[x, 1] W - targets||^2 + l2 ||W||^2 (the bias row is regularised too).

    x [N, D], targets [N, L]. Solved in float64 on the smaller of the two normal systems: (X^T X + l2 I) W =
    X^T Y when N > D, else W = X^T (X X^T + l2 I)^-1 Y (the same minimiser, by the push-through identity).
    """
    if x.dim() != 2 or targets.dim() != 2 or x.shape[0] != targets.shape[0] or x.shape[0] == 0:
        raise ValueError(f"expected x [N, D] and targets [N, L] with N >= 1, got {tuple(x.shape)} and "
                         f"{tuple(targets.shape)}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    xb, y = _with_bias(x), targets.double()
    n, d = xb.shape
    if n > d:
        gram = xb.T @ xb + l2 * torch.eye(d, dtype=torch.float64, device=x.device)
        return torch.linalg.solve(gram, xb.T @ y)
    gram = xb @ xb.T + l2 * torch.eye(n, dtype=torch.float64, device=x.device)
    return xb.T @ torch.linalg.solve(gram, y)


def ridge_predict(w: Tensor, x: Tensor) -> Tensor:
    """Class scores [N, L] of features x [N, D] under W [D+1, L]."""
    return _with_bias(x) @ w


def _accuracy(w: Tensor, x: Tensor, labels: Tensor) -> float:
    return float((ridge_predict(w, x).argmax(-1).cpu() == labels.cpu()).double().mean())


def draw_shots(labels: Tensor, shots: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Indices [L * shots] into labels: ``shots`` distinct images of every class, drawn with ``generator``.

    Raises ValueError naming the classes with fewer than ``shots`` images.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels = labels.cpu()
    picked, short = [], {}
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel() < shots:
            short[c] = members.numel()
            continue
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    if short:
        raise ValueError(f"{shots}-shot needs {shots} images of every class; the pool has fewer for classes "
                         f"{short} (class: images). Use fewer shots or a larger pool.")
    return torch.cat(picked)


def select_l2(x: Tensor, labels: Tensor, holdout_x: Tensor, holdout_labels: Tensor, num_classes: int,
              l2_grid: Sequence[float] = DEFAULT_L2_GRID) -> tuple[float, float]:
    """(l2, held-out accuracy): the grid value whose fit on (x, labels) is most accurate on the held-out
    images; ties go to the larger l2 (the simpler fit)."""
    if not l2_grid:
        raise ValueError("l2_grid is empty; give e.g. 0.01,1,100")
    targets = pm1_targets(labels, num_classes)
    best = (float("-inf"), 0.0)
    for l2 in sorted(float(v) for v in l2_grid):
        acc = _accuracy(ridge_fit(x, targets, l2), holdout_x, holdout_labels)
        if acc >= best[0]:
            best = (acc, l2)
    return best[1], best[0]


def fewshot_evaluate(pool_x: Tensor, pool_labels: Tensor, test_x: Tensor, test_labels: Tensor, num_classes: int,
                     shots: Sequence[int] = (1, 5, 10, 25), l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                     seed: int = 0) -> list[dict]:
    """One row per shot count: {shots, accuracy (test), l2 (chosen), holdout_accuracy, num_holdout, num_test}.

    pool_x [N, D] / pool_labels [N]: features of the images the shots and the held-out set are drawn from
    (disjoint; every pool image that is not a shot is held out). test_x [M, D] / test_labels [M]. The draw for
    n shots uses the seed ``seed * 1000 + n``, so each shot count is reproducible on its own.
    """
    if test_x.shape[0] == 0:
        raise ValueError("no test features")
    rows = []
    for n in shots:
        generator = torch.Generator().manual_seed(int(seed) * 1000 + int(n))
        idx = draw_shots(pool_labels, int(n), num_classes, generator)
        rest = torch.ones(pool_labels.shape[0], dtype=torch.bool)
        rest[idx] = False
        if not rest.any():
            raise ValueError(f"{n}-shot uses the whole pool: no held-out image is left to choose the L2 strength; "
                             "use a larger pool")
        l2, holdout_acc = select_l2(pool_x[idx], pool_labels[idx], pool_x[rest], pool_labels[rest], num_classes,
                                    l2_grid)
        w = ridge_fit(pool_x[idx], pm1_targets(pool_labels[idx], num_classes), l2)
        rows.append({"shots": int(n), "accuracy": _accuracy(w, test_x, test_labels), "l2": l2,
                     "holdout_accuracy": holdout_acc, "num_holdout": int(rest.sum()),
                     "num_test": int(test_x.shape[0])})
    return rows


def format_fewshot_table(rows: Sequence[dict]) -> str:
    """``10-shot  0.873`` lines (test accuracy), with the chosen L2 and the held-out accuracy."""
    lines = [f"{row['shots']}-shot  {row['accuracy']:.3f}   (l2 {row['l2']:g}, held-out acc "
             f"{row['holdout_accuracy']:.3f} on {row['num_holdout']}, test on {row['num_test']})" for row in rows]
    return "\n".join(lines)
