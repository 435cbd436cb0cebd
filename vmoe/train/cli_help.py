"""A shorter ``vmoe fit --help``: one usage line, help texts cut to their first sentences, RST markup removed,
known subclasses listed by class name."""
from __future__ import annotations

import re
from argparse import Action

from jsonargparse import DefaultHelpFormatter

__all__ = ["VMoEHelpFormatter", "short_help"]

# Help texts longer than this keep only their leading sentences (at least the first one).
MAX_HELP_CHARS = 120
# A parser with more options than this shows one generic usage line instead of every option.
MAX_USAGE_OPTIONS = 12
_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)`'\"\]][.!?])\s+(?=[A-Z`(\"'])")
_DEFAULT_SENTENCE = re.compile(r"\s*Default(?: is)?:?\s+\S+?\.(?=\s|$)")


def _plain(text: str) -> str:
    """RST roles (``:class:`~a.b.C``` -> C) and literals (````x```` -> x) as plain text, on one line."""
    text = _RST_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return " ".join(text.replace("``", "").split())


def short_help(text: str, max_chars: int = MAX_HELP_CHARS) -> str:
    """The leading sentences of ``text`` that fit in ``max_chars`` (always the first one), without the
    "Default: ..." sentence the formatter shows anyway."""
    plain = _plain(text)
    sentences = _SENTENCE_END.split(_DEFAULT_SENTENCE.sub("", plain).strip() or plain)
    kept = [sentences[0]]
    for sentence in sentences[1:]:
        if len(" ".join(kept + [sentence])) > max_chars:
            break
        kept.append(sentence)
    return " ".join(kept)


class VMoEHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter (types and defaults shown) with shorter texts: see the module docstring."""

    def _get_help_string(self, action: Action) -> str:
        help_text = action.help
        if isinstance(help_text, str) and "%(" not in help_text:
            action.help = short_help(help_text)
        try:
            return _class_name_subclasses(super()._get_help_string(action))
        finally:
            action.help = help_text

    def start_section(self, heading: str | None) -> None:
        # Group titles are the first lines of class docstrings, sometimes cut mid-sentence: keep one sentence.
        if heading:
            heading = short_help(heading, max_chars=0).rstrip(".:")
        super().start_section(heading)

    def _format_usage(self, usage, actions, groups, prefix):  # type: ignore[override]
        options = [a for a in actions if a.option_strings]
        if usage is None and len(options) > MAX_USAGE_OPTIONS:
            usage = "%(prog)s [-h] [-c CONFIG] [--print_config[=flags]] [--KEY VALUE ...]"
        return super()._format_usage(usage, actions, groups, prefix)


def _class_name_subclasses(help_string: str) -> str:
    """"... known subclasses: a.b.C, d.E)" -> "... known subclasses: C, E)" (jsonargparse accepts the class name
    of a known subclass in place of its class path)."""
    head, sep, names = help_string.partition("known subclasses: ")
    if not sep:
        return help_string
    names, close, tail = names.partition(")")
    short = ", ".join(name.strip().rsplit(".", 1)[-1] for name in names.split(","))
    return head + sep + short + close + tail
