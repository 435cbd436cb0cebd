"""A progress display for long commands (sweep, visualize, fewshot), on stderr through rich."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress", "track"]

T = TypeVar("T")


@contextmanager
def progress(description: str, total: int | None, enabled: bool | None = None) -> Iterator:
    """Yields ``advance(n=1)``; shows a bar with elapsed and remaining time while the block runs.

    enabled: None = only when stderr is a terminal (logs and CI stay free of redraws).
    """
    enabled = sys.stderr.isatty() if enabled is None else enabled
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def track(iterable: Iterable[T], description: str, total: int | None = None, enabled: bool | None = None
          ) -> Iterator[T]:
    """Iterate ``iterable`` under :func:`progress` (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress(description, total, enabled) as advance:
        for item in iterable:
            yield item
            advance()
