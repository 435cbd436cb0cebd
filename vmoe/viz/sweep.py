"""Capacity sweep: accuracy and dropped tokens of a trained V-MoE at many eval capacity factors,
with vanilla routing and with Batch Priority Routing (the V-MoE paper's capacity experiment)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .collect import capacity_blocks, no_capacity_message, route

__all__ = ["DEFAULT_CAPACITY_FACTORS", "MODES", "capacity_sweep", "check_sweepable", "format_sweep_table",
           "mcnemar_p_value", "wilson_interval"]

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


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test of two classifiers on the same images.

    only_a / only_b: images that only A / only B got right. Under "A and B are equally accurate" each such
    image is a fair coin, so p = 2 * P(X <= min(only_a, only_b)) for X ~ Binomial(only_a + only_b, 1/2),
    capped at 1 (scipy's exact binomial test); 1.0 when there is no disagreement at all.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0, got {only_a} and {only_b}")
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(min(1.0, binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for z = 1.96): (low, high) in [0, 1].

    An accuracy measured on n images is successes / n; the interval says how far it may move on another draw of
    n images. Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 or n.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _count_drops(routings: dict) -> tuple[int, int, int, int]:
    """(tokens that lost every choice, tokens, assignments dropped, assignments) over the MoE layers."""
    dropped_tokens = tokens = dropped_assignments = assignments = 0
    for routing in routings.values():
        kept = routing.kept  # [B, T, K]
        dropped_tokens += int((~kept.any(-1)).sum())
        tokens += kept.shape[0] * kept.shape[1]
        dropped_assignments += int((~kept).sum())
        assignments += kept.numel()
    return dropped_tokens, tokens, dropped_assignments, assignments


def check_sweepable(model: nn.Module) -> None:
    """ValueError when no MoE block of ``model`` has a capacity (Soft MoE): there is no factor to sweep."""
    if not capacity_blocks(model):
        raise ValueError(f"no capacity to sweep: {no_capacity_message(model)}, so the eval capacity factor and "
                         "BPR change nothing; `vmoe test` gives its accuracy")


def _evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], factor: float, mode: str,
              max_batches: int | None, advance: Callable[[int], None]) -> tuple[dict, Tensor]:
    """One (capacity factor, mode) pass: its row and the per-image hits [N] (bool, in loader order)."""
    hits, counts = [], [0, 0, 0, 0]
    capped = capacity_blocks(model)
    for step, (images, labels) in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        logits, routings = route(model, images, eval_capacity_factor=factor, batch_priority=MODES[mode])
        hits.append(logits.argmax(-1).cpu() == labels.cpu())
        counts = [a + b for a, b in zip(counts, _count_drops({i: r for i, r in routings.items() if i in capped}))]
        advance(1)
    if not hits:
        raise ValueError("the sweep saw no images: the data loader is empty")
    hit = torch.cat(hits)
    row = {"capacity_factor": factor, "mode": mode, "accuracy": float(hit.double().mean()),
           "dropped_tokens": counts[0] / max(counts[1], 1), "dropped_assignments": counts[2] / max(counts[3], 1),
           "num_images": int(hit.numel()), "only_correct": None, "p_value": None}
    return row, hit


def _pair_modes(rows: list[dict], hits: dict[str, Tensor]) -> None:
    """Fill only_correct and the McNemar p-value into the vanilla and BPR rows of one capacity factor."""
    only = {m: int((hits[m] & ~hits[other]).sum()) for m, other in (("vanilla", "bpr"), ("bpr", "vanilla"))}
    p_value = mcnemar_p_value(only["vanilla"], only["bpr"])
    for row in rows:
        row.update(only_correct=only[row["mode"]], p_value=p_value)


def capacity_sweep(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                   capacity_factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
                   modes: Sequence[str] = ("vanilla", "bpr"), max_batches: int | None = None,
                   show_progress: bool | None = None) -> list[dict]:
    """Evaluate ``model`` (eval mode) on (images, labels) batches for every capacity factor and mode.

    ``batches`` must be re-iterable in the same order (an unshuffled DataLoader: the paired counts compare
    the two modes image by image). Each batch is one forward, so its composition is the routing group that
    BPR prioritises within: use the same batch size as the evaluation you compare to.
    Returns one dict per (capacity_factor, mode): accuracy, dropped_tokens (share of routed tokens, prefix
    included, that lost every choice, over all MoE layers with a capacity) and dropped_assignments (share of
    the K choices that got no slot), plus num_images. Blocks without capacity (Soft MoE) route as they are
    at every factor; ValueError when no block has a capacity (:func:`check_sweepable`). With both modes: only_correct (images this mode got right
    and the other wrong) and p_value (exact McNemar test of the two modes at this factor, the same on both
    rows), so a gap between vanilla and BPR can be told from noise; None with a single mode.
    show_progress: a progress bar on stderr (None = when stderr is a terminal).
    """
    from ..progress import progress

    factors = _check_factors(capacity_factors)
    check_sweepable(model)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown routing modes {unknown}; valid: {sorted(MODES)}")
    per_pass = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if per_pass is not None and max_batches is not None:
        per_pass = min(per_pass, max_batches)
    total = None if per_pass is None else per_pass * len(factors) * len(modes)
    rows: list[dict] = []
    with progress("capacity sweep", total, show_progress) as advance:
        for factor in factors:
            factor_rows, hits = [], {}
            for mode in modes:
                row, hits[mode] = _evaluate(model, batches, factor, mode, max_batches, advance)
                factor_rows.append(row)
            if set(hits) == set(MODES):
                _pair_modes(factor_rows, hits)
            rows += factor_rows
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
    paired = any(r.get("p_value") is not None for r in rows)
    if paired:
        head += f" | {'BPR-only/vanilla-only right':>27} {'p':>6}"
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
        if paired:
            bpr, vanilla = by_key.get((factor, "bpr"), {}), by_key.get((factor, "vanilla"), {})
            if bpr.get("p_value") is None:
                line += f" | {'-':>27} {'-':>6}"
            else:
                counts = f"{bpr['only_correct']} / {vanilla['only_correct']}"
                p_text = "<0.001" if bpr["p_value"] < 0.001 else f"{bpr['p_value']:.3f}"
                line += f" | {counts:>27} {p_text:>6}"
        lines.append(line)
    lines.append("acc = test accuracy; drop = tokens that lost every choice; asg drop = choices without a slot"
                 + ("; p = exact McNemar test, BPR vs vanilla on the same images" if paired else ""))
    return "\n".join(lines)
