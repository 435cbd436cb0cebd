"""One policy for configs found beside checkpoints (``config.yaml`` of a run) and in Hub folders.

Such a file may come from someone else, and a ``class_path`` in it names code to run. Only vmoe's own classes
(``vmoe.*``) are imported and instantiated from it, or a class the user allowed explicitly (``--allow_class``);
the check happens before the module is imported (an import runs code too). The class must subclass what the
command expects (a LightningDataModule), and its ``init_args`` go through the typed conversion the CLI applies
(jsonargparse, by the class's signature), so ``"false"`` means False and not a non-empty, true string.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterable, Mapping

__all__ = ["PROJECT_PACKAGE", "is_project_class", "allowed_class", "instantiate_typed", "DEFAULT_DATA_MODULE"]

PROJECT_PACKAGE = "vmoe"
# A bare class name in a data section means a vmoe datamodule (as LightningCLI resolves it).
DEFAULT_DATA_MODULE = "vmoe.train.data"


def _full_path(class_path: str) -> str:
    return class_path if "." in class_path else f"{DEFAULT_DATA_MODULE}.{class_path}"


def is_project_class(class_path: str) -> bool:
    """True for a class path inside the vmoe package (``vmoe.x.y.Name`` or a bare vmoe datamodule name)."""
    module = _full_path(class_path).rpartition(".")[0]
    return module == PROJECT_PACKAGE or module.startswith(PROJECT_PACKAGE + ".")


def allowed_class(class_path: Any, base: type, *, source: str, allowed: Iterable[str] = ()) -> type:
    """The class ``class_path`` names, imported only when it is vmoe's own or listed in ``allowed``; it must be a
    subclass of ``base``. ValueError naming ``source``, the class path and how to allow it otherwise."""
    if not isinstance(class_path, str) or not class_path or class_path.startswith(".") or class_path.endswith("."):
        raise ValueError(f"{source}: class_path must be a dotted class name (e.g. vmoe.train.data."
                         f"DigitsDataModule), got {class_path!r}")
    full = _full_path(class_path)
    allowed = {_full_path(name) for name in allowed}
    if not is_project_class(full) and full not in allowed:
        raise ValueError(f"{source}: class_path {class_path!r} is not one of vmoe's classes; a config found beside a "
                         f"checkpoint may only name vmoe.* classes (it may come from someone else, and instantiating "
                         f"a class runs its code). If you trust it, pass --allow_class {class_path}")
    module_name, _, name = full.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{source}: class_path {class_path!r} cannot be imported ({err})") from err
    if not isinstance(obj, type) or not issubclass(obj, base):
        raise ValueError(f"{source}: class_path {class_path!r} is {type(obj).__name__} {obj!r:.60}, not a subclass "
                         f"of {base.__module__}.{base.__qualname__}")
    return obj


def instantiate_typed(cls: type, init_args: Mapping[str, Any] | None, *, source: str) -> Any:
    """``cls(**init_args)`` after the CLI's typed conversion and checking of every argument (jsonargparse by the
    signature of ``cls``): unknown names and values of the wrong type are a ValueError naming ``source``."""
    from jsonargparse import ArgumentParser

    if init_args is not None and not isinstance(init_args, Mapping):
        raise ValueError(f"{source}: init_args of {cls.__name__} must be a mapping, got {type(init_args).__name__}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init", instantiate=True, fail_untyped=False)
    try:
        config = parser.parse_object({"init": dict(init_args or {})})
        return parser.instantiate_classes(config)["init"]
    except Exception as err:  # noqa: BLE001 (jsonargparse raises ArgumentError/TypeError/ValueError)
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300] or type(err).__name__
        raise ValueError(f"{source}: init_args of {cls.__module__}.{cls.__name__}: {text}") from err
