"""Command-line conveniences shared by the extra ``vmoe`` commands (sweep, visualize, fewshot)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["bracket_lists", "flag_value"]


def bracket_lists(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """Let the list options ``flags`` be written ``1,5,10`` as well as ``[1,5,10]`` (jsonargparse reads the
    bracketed form); ``--flag value`` and ``--flag=value`` both work."""
    out = list(argv)
    for i, arg in enumerate(out):
        for flag in flags:
            if arg == flag and i + 1 < len(out) and not out[i + 1].lstrip().startswith("["):
                out[i + 1] = f"[{out[i + 1]}]"
            elif arg.startswith(flag + "=") and not arg[len(flag) + 1:].lstrip().startswith("["):
                out[i] = f"{flag}=[{arg[len(flag) + 1:]}]"
    return out


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` in argv ("--flag v" or "--flag=v"), the last one wins."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value
