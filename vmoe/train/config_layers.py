"""Layered ``--config`` files: a later file's ``trainer.callbacks`` list replaces an earlier one's (jsonargparse
replaces lists); say so when that drops callbacks, and how to add instead (``--trainer.callbacks+ FILE``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["config_files", "dropped_callbacks"]


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``-c/--config`` files of a command line, in order."""
    files = []
    for i, token in enumerate(argv):
        if token in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif token.startswith("--config="):
            files.append(token[len("--config="):])
    return files


def _callback_names(path: str) -> list[str] | None:
    """class_path of each entry of ``trainer.callbacks`` in a config file; None when it sets none."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None  # the parser reports an unreadable file itself
    trainer = config.get("trainer") if isinstance(config, dict) else None
    callbacks: Any = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if callbacks is None:
        return None
    entries = callbacks if isinstance(callbacks, list) else [callbacks]
    return [str(e.get("class_path")) if isinstance(e, dict) else str(e) for e in entries]


def dropped_callbacks(argv: Sequence[str]) -> list[str]:
    """One message per config file whose ``trainer.callbacks`` replaces callbacks of an earlier one."""
    messages, earlier, earlier_file = [], None, None
    for path in config_files(argv):
        names = _callback_names(path)
        if names is None:
            continue
        if earlier is not None:
            lost = [name for name in earlier if name not in names]
            if lost:
                messages.append(f"{path} replaces the trainer.callbacks of {earlier_file}, dropping "
                                f"{', '.join(n.rsplit('.', 1)[-1] for n in lost)}: to add callbacks to a config, "
                                "pass them with --trainer.callbacks+ FILE (a YAML file holding one callback or a "
                                "list of them)")
        earlier, earlier_file = names, path
    return messages
