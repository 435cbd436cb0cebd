"""vmoe's timm names exist wherever timm is imported after ``import vmoe``, without ``import vmoe`` importing timm.

``import vmoe`` stays light (``vmoe --help`` answers at once), yet ``import vmoe, timm;
timm.create_model("vmoe_timm_s16_e8_every2")`` works: if timm is loaded already, the names are registered at
once; otherwise a meta-path finder waits for timm's import and registers them right after timm has loaded.
:mod:`vmoe.models.timm_names` imports only timm at module level, so this is safe even while timm is being
imported from inside a vmoe module (``vmoe.moe`` uses timm's Mlp).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

__all__ = ["register_when_timm_loads"]

NAMES_MODULE = "vmoe.models.timm_names"  # importing it registers every name


class _RegisterAfterLoading:
    """A loader that runs timm's own loader, then imports the names module."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        importlib.import_module(NAMES_MODULE)

    def __getattr__(self, name: str) -> Any:  # resources, get_code, is_package, ...: timm's loader answers
        return getattr(self._loader, name)


class _TimmFinder:
    """A one-shot meta-path finder: on ``import timm``, hands out timm's own spec with the loader above."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding this finder again
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoading(spec.loader)
        return spec


def register_when_timm_loads() -> None:
    """Register vmoe's timm names now if timm is loaded, else right after timm's import (once)."""
    if "timm" in sys.modules:
        importlib.import_module(NAMES_MODULE)
    elif not any(isinstance(finder, _TimmFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())
