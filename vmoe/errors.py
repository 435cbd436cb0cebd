"""How a ``vmoe`` command fails: one readable line and an exit status, the traceback only on demand."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

__all__ = ["DEBUG_ENV", "UsageError", "exit_status"]

DEBUG_ENV = "VMOE_DEBUG"


class UsageError(ValueError):
    """A command that cannot run as given (exit status 2, like a parsing error)."""


def exit_status(prog: str, command: Callable[[], Any]) -> int:
    """Run ``command()``: 0 on success (or the int it returns), 2 for a UsageError, 1 for any other error,
    printed as one ``<prog>: error: <message>`` line without the traceback (and, but for a UsageError, a hint
    that VMOE_DEBUG=1 lets the exception propagate, traceback included). SystemExit (a parser's own exit) passes through."""
    try:
        result = command()
    except Exception as err:  # noqa: BLE001  (every error: one readable line, the traceback on demand)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = str(err) or type(err).__name__
        kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
        usage = isinstance(err, UsageError)  # said all there is: no traceback worth asking for
        sys.stderr.write(f"{prog}: error: {kind}{message}\n" + ("" if usage else f"(set {DEBUG_ENV}=1 for the traceback)\n"))
        return 2 if usage else 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
