"""Command-line mistakes answered in one line: the innermost cause of a validation error, and the closest valid
names for a misspelled option (``did you mean --trainer.max_epochs?``); the full usage only on ``--help``."""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from typing import Any, Iterable, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from ..errors import DEBUG_ENV
from .cli_help import VMoEHelpFormatter

__all__ = ["VMoEArgumentParser", "closest", "concise_error", "innermost_cause", "innermost_line", "init_parameters"]


# Lines of jsonargparse's nested messages that restate the context rather than the cause.
_NOISE = ("Given value", "Subtypes:", "Errors:", "Does not validate against any of the Union subtypes",
          "- Expected a <class 'NoneType'>", "Expected a <class 'NoneType'>")
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"')
_NOT_ACCEPTED = re.compile(r"(?:Subcommand '[^']+'|Group '([^']+)'|Key '[^']*') does not accept (?:option|nested key) "
                           r"'([^']+)'")
_OPTION_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")


def closest(name: str, valid: Iterable[str], n: int = 2) -> list[str]:
    """The valid names closest to a misspelled ``name``, best first: the best one and any other (up to n in all)
    about as close; [] when none is close."""
    valid = [v for v in dict.fromkeys(valid) if not v.endswith("+")]  # "--x+" (append) restates "--x"
    found = _ranked(name, valid)
    if not found:  # the last dotted part alone: --model.num_expert vs --model.num_experts among 300 names
        head, _, tail = name.rpartition(".")
        same_head = {v.rpartition(".")[2]: v for v in valid if v.rpartition(".")[0] == head}
        found = [(score, same_head[t]) for score, t in _ranked(tail, list(same_head))]
    return [v for score, v in found[:n] if score >= found[0][0] - 0.05]


def _ranked(name: str, valid: list[str]) -> list[tuple[float, str]]:
    scores = [(difflib.SequenceMatcher(None, name, v).ratio(), v) for v in valid]
    return sorted(((s, v) for s, v in scores if s >= 0.6), key=lambda sv: -sv[0])


def _did_you_mean(names: list[str]) -> str:
    return f"; did you mean {' or '.join(names)}?" if names else ""


def innermost_line(message: str) -> str:
    """The deepest line of a nested jsonargparse message, prefixed by the outermost option it concerns:
    'Parser key "model.lr":\\n  Expected a float...' -> '--model.lr: Expected a float...'."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    key = _PARSER_KEY.match(lines[0].strip())
    causes = [line for line in lines[1 if key else 0:] if not line.strip().startswith(_NOISE)]
    if not causes:
        return lines[0].strip()
    depth = max(len(line) - len(line.lstrip()) for line in causes)
    deepest = next(line for line in causes if len(line) - len(line.lstrip()) == depth).strip().lstrip("- ").strip()
    return f"--{key.group(1)}: {deepest}" if key else deepest


def init_parameters(cls: type) -> list[str]:
    """Names of the constructor arguments of ``cls``, following ``**kwargs`` up the class hierarchy."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _class_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        return init_parameters(getattr(importlib.import_module(module), name))
    except Exception:  # noqa: BLE001  (a suggestion is a nicety: no suggestion rather than a second error)
        return []


def concise_error(message: str, options: Iterable[str]) -> str:
    """One line for a parsing error ``message``, with the closest of ``options`` (the parser's "--a.b" names)
    for each misspelled one."""
    options = list(options)
    if message.startswith("unrecognized arguments:"):
        tokens = message[len("unrecognized arguments:"):].split()
        flags = [t.split("=", 1)[0] for t in tokens if t.startswith("-") and not _is_number(t)]
        if flags:
            return "; ".join(f"unrecognized option {flag}{_did_you_mean(closest(flag, options))}" for flag in flags)
        return message
    line = innermost_line(message)
    not_accepted = _NOT_ACCEPTED.search(message)
    if not_accepted:  # a key of a config file (or --section '{...}') that no option has
        group, key = not_accepted.groups()
        key = f"{group}.{key}" if group else key
        keys = [o[2:] for o in options]
        return f"unknown key {key!r} (in a config file or a dict value){_did_you_mean(closest(key, keys))}"
    option = _OPTION_NOT_ACCEPTED.search(message)
    class_path = _CLASS_PATH.search(message)
    key = _PARSER_KEY.match(message)
    if option and class_path and key:  # --data.batch_sz: an argument the chosen class does not take
        name = f"--{key.group(1)}.{option.group(1)}"
        valid = [f"--{key.group(1)}.{p}" for p in _class_parameters(class_path.group(1))]
        return f"{class_path.group(1).rsplit('.', 1)[-1]} has no argument {option.group(1)!r} ({name})" \
               f"{_did_you_mean(closest(name, valid))}"
    return line


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class VMoEArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (``vmoe fit: error: ...``, exit status 2) naming the
    closest valid options, with the short help formatter; ``VMOE_DEBUG=1`` restores jsonargparse's report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", VMoEHelpFormatter)
        super().__init__(*args, **kwargs)

    def _parser_for(self, ex: Exception | None) -> "VMoEArgumentParser":
        parser = getattr(ex, "subcommand_parser", None)
        if parser is not None:
            return parser
        action = getattr(self, "_subcommands_action", None)
        if action is not None:  # the main parser: the subcommand named on the command line
            name = next((a for a in (getattr(self, "args", None) or []) if a in action.choices), None)
            if name is not None:
                return action.choices[name]
        return self

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            super().error(message, ex)
        parser = self._parser_for(ex)
        options = [o for o in parser._option_string_actions if o.startswith("--")]
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {concise_error(message, options)}\n"
                         f"({prog} --help lists the options)\n")
        sys.exit(2)


def innermost_cause(err: BaseException) -> BaseException:
    """The exception that jsonargparse (or Lightning's instantiation) wrapped, followed down ``__cause__`` while
    the wrapper was raised inside jsonargparse; ``err`` itself when it is the cause."""
    while err.__cause__ is not None and _raised_in_jsonargparse(err):
        err = err.__cause__
    return err


def _raised_in_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")
