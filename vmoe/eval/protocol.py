"""The two few-shot protocols on extracted features: the reference's (L2 by mean rank of the evaluated split's
accuracy across datasets and seeds) and a held-out one (L2 by accuracy on further training images, never on
the evaluated split's labels). Both use the reference's solver and nested seeded shot draws
(``vmoe.eval.fewshot``). Shapes: P pool images, M evaluated images, D features, L classes, S shot seeds,
Q images drawn per class, G L2 values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .fewshot import (REFERENCE_L2_GRID, LinearProbe, check_l2_grid, check_num_classes, mean_rank_choice,
                      reference_shot_seed)

__all__ = ["FewShotTask", "SELECTIONS", "DEFAULT_HOLDOUT_PER_CLASS", "check_shots", "check_protocol", "shot_seeds",
           "evaluate_mean_rank", "evaluate_heldout", "evaluate", "format_fewshot_table"]

SELECTIONS = ("mean_rank", "heldout")
DEFAULT_HOLDOUT_PER_CLASS = 20


@dataclass(frozen=True)
class FewShotTask:
    """One dataset's features. pool_x [P, D] / pool_y [P]: the drawn training images; draws [S, L, Q]: rows of
    pool_x, per shot seed and class in draw order (the n-shot set of seed s is ``draws[s, :, :n]``);
    test_x [M, D] / test_y [M]: the evaluated split; seeds [S]: the NumPy seeds of the draws."""
    pool_x: Tensor
    pool_y: Tensor
    draws: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        check_num_classes(self.num_classes)
        s, l, _ = self.draws.shape
        if l != self.num_classes or s != len(self.seeds) or s == 0:
            raise ValueError(f"draws must be [seeds={len(self.seeds)}, classes={self.num_classes}, Q], got "
                             f"{tuple(self.draws.shape)}")

    def shots(self, seed_index: int, n: int) -> tuple[Tensor, Tensor]:
        """(x [L * n, D], y [L * n]): the n-shot training set of draw ``seed_index``."""
        idx = self.draws[seed_index, :, :n].flatten()
        return self.pool_x[idx], self.pool_y[idx]


def check_shots(shots: Sequence[int]) -> list[int]:
    """Shot counts as sorted distinct ints >= 1 (ValueError otherwise, naming them)."""
    if not shots or any(isinstance(n, bool) or int(n) != n or n < 1 for n in shots):
        raise ValueError(f"shots must be a non-empty list of counts >= 1, got {list(shots)}")
    return sorted({int(n) for n in shots})


def check_protocol(l2_selection: str, holdout_per_class: int | None, num_seeds: int) -> int:
    """Validate the protocol settings; returns the held-out images per class (0 for ``mean_rank``, which uses
    none; ``holdout_per_class`` defaults to 20 for ``heldout`` and may not be given for ``mean_rank``)."""
    if l2_selection not in SELECTIONS:
        raise ValueError(f"l2_selection must be one of {SELECTIONS}, got {l2_selection!r}")
    if isinstance(num_seeds, bool) or int(num_seeds) != num_seeds or num_seeds < 1:
        raise ValueError(f"num_seeds must be an integer >= 1, got {num_seeds!r}")
    if l2_selection == "mean_rank":
        if holdout_per_class is not None:
            raise ValueError(f"holdout_per_class={holdout_per_class} applies to l2_selection='heldout' only; the "
                             "reference's mean-rank selection holds no images out")
        return 0
    holdout = DEFAULT_HOLDOUT_PER_CLASS if holdout_per_class is None else holdout_per_class
    if isinstance(holdout, bool) or int(holdout) != holdout or holdout < 1:
        raise ValueError(f"holdout_per_class must be an integer >= 1, got {holdout_per_class!r}")
    return int(holdout)


def shot_seeds(seed: int, num_seeds: int) -> tuple[int, ...]:
    """The NumPy seeds of ``num_seeds`` shot draws under ``seed``, derived as the reference derives them."""
    return tuple(reference_shot_seed(seed, i) for i in range(num_seeds))


def _check_depth(task: FewShotTask, needed: int, what: str) -> None:
    if task.draws.shape[2] < needed:
        raise ValueError(f"{what} needs {needed} drawn images per class, the task has {task.draws.shape[2]}")


def _test_accuracies(task: FewShotTask, n: int, grid: list[float]) -> Tensor:
    """Accuracy [S, G] on the evaluated split of the n-shot probe of every draw at every L2."""
    return torch.tensor([LinearProbe(*task.shots(s, n), task.num_classes).accuracies(task.test_x, task.test_y, grid)
                         for s in range(len(task.seeds))], dtype=torch.float64)


def evaluate_mean_rank(tasks: Mapping[str, FewShotTask], shots: Sequence[int] = (1, 5, 10, 25),
                       l2_grid: Sequence[float] = REFERENCE_L2_GRID) -> list[dict]:
    """The reference's protocol. For every shot count, each (dataset, seed) ranks the grid by its accuracy on the
    evaluated split; the L2 with the best mean rank is used for all of them. One row per (dataset, shot count):
    {dataset, shots, accuracy (mean over seeds at the chosen L2), seed_accuracies, l2, selection, num_seeds,
    num_datasets, num_test, accuracy_by_l2 (mean over seeds, one per grid value)}.
    """
    shots, grid = check_shots(shots), check_l2_grid(l2_grid).tolist()
    if not tasks:
        raise ValueError("no datasets to evaluate")
    for task in tasks.values():
        _check_depth(task, shots[-1], f"{shots[-1]}-shot")
    accs = {name: {n: _test_accuracies(task, n, grid) for n in shots} for name, task in tasks.items()}
    rows = []
    for n in shots:
        best = mean_rank_choice(torch.cat([accs[name][n] for name in tasks]))
        for name, task in tasks.items():
            table = accs[name][n]
            rows.append({"dataset": name, "shots": n, "accuracy": float(table[:, best].mean()),
                         "seed_accuracies": table[:, best].tolist(), "l2": grid[best], "selection": "mean_rank",
                         "num_seeds": len(task.seeds), "num_datasets": len(tasks),
                         "num_test": int(task.test_x.shape[0]), "accuracy_by_l2": table.mean(0).tolist()})
    return rows


def evaluate_heldout(task: FewShotTask, shots: Sequence[int] = (1, 5, 10, 25),
                     l2_grid: Sequence[float] = REFERENCE_L2_GRID, name: str = "data") -> list[dict]:
    """The held-out protocol: the draws hold max(shots) shot images per class followed by held-out images
    (``draws[:, :, max(shots):]``, never among the shots); per shot count, the L2 with the best held-out accuracy
    (mean over seeds; ties go to the larger L2, the simpler fit) is used on the evaluated split, whose labels
    play no part in the choice. Rows as ``evaluate_mean_rank`` plus holdout_accuracy and num_holdout.
    """
    shots, grid = check_shots(shots), check_l2_grid(l2_grid).tolist()
    _check_depth(task, shots[-1] + 1, f"{shots[-1]}-shot with a held-out set")
    held_idx = task.draws[:, :, shots[-1]:].flatten(1)  # [S, L * (Q - max shots)]
    rows = []
    for n in shots:
        held, test = [], []
        for s in range(len(task.seeds)):
            probe = LinearProbe(*task.shots(s, n), task.num_classes)
            held.append(probe.accuracies(task.pool_x[held_idx[s]], task.pool_y[held_idx[s]], grid))
            test.append(probe.accuracies(task.test_x, task.test_y, grid))
        held_mean, test = torch.tensor(held, dtype=torch.float64).mean(0), torch.tensor(test, dtype=torch.float64)
        best = max(range(len(grid)), key=lambda i: (float(held_mean[i]), grid[i]))
        rows.append({"dataset": name, "shots": n, "accuracy": float(test[:, best].mean()),
                     "seed_accuracies": test[:, best].tolist(), "l2": grid[best], "selection": "heldout",
                     "num_seeds": len(task.seeds), "num_datasets": 1, "num_test": int(task.test_x.shape[0]),
                     "accuracy_by_l2": test.mean(0).tolist(), "holdout_accuracy": float(held_mean[best]),
                     "num_holdout": int(held_idx.shape[1])})
    return rows


def evaluate(task: FewShotTask, shots: Sequence[int], l2_grid: Sequence[float], l2_selection: str,
             name: str = "data") -> list[dict]:
    """One dataset under either protocol (``l2_selection`` of SELECTIONS)."""
    if l2_selection == "mean_rank":
        return evaluate_mean_rank({name: task}, shots, l2_grid)
    if l2_selection == "heldout":
        return evaluate_heldout(task, shots, l2_grid, name)
    raise ValueError(f"l2_selection must be one of {SELECTIONS}, got {l2_selection!r}")


def format_fewshot_table(rows: Sequence[dict]) -> str:
    """``10-shot  0.873   (l2 8, ...)`` lines: the accuracy on the evaluated split, the chosen L2 and how."""
    lines = []
    for row in rows:
        prefix = f"{row['dataset']}  " if row["num_datasets"] > 1 else ""
        if row["selection"] == "mean_rank":
            how = f"best mean rank over {row['num_datasets']} dataset(s) x {row['num_seeds']} seed(s)"
        else:
            how = f"held-out acc {row['holdout_accuracy']:.3f} on {row['num_holdout']}"
        spread = ""
        if row["num_seeds"] > 1:
            spread = f", seeds {min(row['seed_accuracies']):.3f}-{max(row['seed_accuracies']):.3f}"
        lines.append(f"{prefix}{row['shots']}-shot  {row['accuracy']:.3f}   (l2 {row['l2']:g} by {how}{spread}, "
                     f"evaluated on {row['num_test']})")
    return "\n".join(lines)
