"""Keep Lightning's output to what a vmoe user acts on: no advertising tips, and no warning that is certain to
fire on every evaluation of a checkpoint (the run's ``dirpath`` differs from the one the checkpoint recorded
whenever ``vmoe test`` logs into a new version directory, and nothing of the best-k bookkeeping it talks about
is used when evaluating)."""
from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_lightning", "TIP_PREFIX"]

TIP_PREFIX = "💡 Tip:"
_EVALUATING = ("validate", "test", "predict")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def quiet_lightning(subcommand: str | None) -> None:
    """Install the filters (idempotent); ``subcommand``: the vmoe command about to run."""
    logger = logging.getLogger("lightning.pytorch")
    targets = list(logger.handlers) or list(logging.getLogger().handlers)
    for handler in targets:
        if not any(isinstance(f, _DropTips) for f in handler.filters):
            handler.addFilter(_DropTips())
    if subcommand in _EVALUATING:
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from .*", category=UserWarning)
