"""Packages whose public names are imported from their modules on first use (PEP 562), so that importing the
package (``import vmoe``, ``vmoe --help``) costs nothing until a name is used."""
from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["lazy_names"]


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps each public name to the module that defines it
    (absolute, e.g. ``"vmoe.models.build"``); a name equal to its module's last part is the module itself."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(module)
        return loaded if module == f"{package}.{name}" else getattr(loaded, name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
