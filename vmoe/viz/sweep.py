"""Capacity sweep: accuracy and dropped tokens of a trained V-MoE at many eval capacity factors,
with vanilla routing and with Batch Priority Routing (the V-MoE paper's capacity experiment)."""
from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor, nn

from .collect import route

__all__ = ["DEFAULT_CAPACITY_FACTORS", "MODES", "capacity_sweep", "format_sweep_table"]

DEFAULT_CAPACITY_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
MODES = {"vanilla": False, "bpr": True}


def _check_factors(capacity_factors: Sequence[float]) -> list[float]:
    factors = [float(f) for f in capacity_factors]
    if not factors:
        raise ValueError("capacity_factors is empty; give e.g. 0.5,1.0")
    bad = [f for f in factors if not f > 0]
    if bad:
        raise ValueError(f"capacity factors must be > 0, got {bad}")
    return factors


def capacity_sweep(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                   capacity_factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
                   modes: Sequence[str] = ("vanilla", "bpr"), max_batches: int | None = None) -> list[dict]:
    """Evaluate ``model`` (eval mode) on (images, labels) batches for every capacity factor and mode.

    ``batches`` must be re-iterable (a DataLoader). Each batch is one forward, so its composition is the
    routing group that BPR prioritises within: use the same batch size as the evaluation you compare to.
    Returns one dict per (capacity_factor, mode): accuracy, dropped_tokens (share of routed tokens, prefix
    included, that lost every choice, over all MoE layers) and dropped_assignments (share of the K
    choices that got no slot), plus num_images.
    """
    factors = _check_factors(capacity_factors)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown routing modes {unknown}; valid: {sorted(MODES)}")
    rows = []
    for factor in factors:
        for mode in modes:
            correct = images_seen = 0
            dropped_tokens = tokens = dropped_assignments = assignments = 0
            for step, (images, labels) in enumerate(batches):
                if max_batches is not None and step >= max_batches:
                    break
                logits, routings = route(model, images, eval_capacity_factor=factor, batch_priority=MODES[mode])
                correct += int((logits.argmax(-1).cpu() == labels.cpu()).sum())
                images_seen += int(labels.shape[0])
                for routing in routings.values():
                    kept = routing.kept  # [B, T, K]
                    dropped_tokens += int((~kept.any(-1)).sum())
                    tokens += kept.shape[0] * kept.shape[1]
                    dropped_assignments += int((~kept).sum())
                    assignments += kept.numel()
            if images_seen == 0:
                raise ValueError("the sweep saw no images: the data loader is empty")
            rows.append({"capacity_factor": factor, "mode": mode, "accuracy": correct / images_seen,
                         "dropped_tokens": dropped_tokens / max(tokens, 1),
                         "dropped_assignments": dropped_assignments / max(assignments, 1),
                         "num_images": images_seen})
    return rows


def format_sweep_table(rows: Sequence[dict]) -> str:
    """A plain-text table with one line per capacity factor and the modes side by side."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    by_key = {(r["capacity_factor"], r["mode"]): r for r in rows}
    names = {"vanilla": "vanilla", "bpr": "BPR"}
    head = f"{'capacity':>8}"
    for m in modes:
        n = names.get(m, m)
        head += f" | {n + ' acc':>11} {n + ' drop':>12} {n + ' asg drop':>14}"
    lines = [head, "-" * len(head)]
    for factor in sorted(dict.fromkeys(r["capacity_factor"] for r in rows)):
        line = f"{factor:>8g}"
        for m in modes:
            r = by_key.get((factor, m))
            if r is None:
                line += f" | {'-':>11} {'-':>12} {'-':>14}"
            else:
                line += (f" | {100 * r['accuracy']:>10.2f}% {100 * r['dropped_tokens']:>11.2f}%"
                         f" {100 * r['dropped_assignments']:>13.2f}%")
        lines.append(line)
    lines.append("acc = test accuracy; drop = tokens that lost every choice; asg drop = choices without a slot")
    return "\n".join(lines)
