"""Command-line regexes (``cmdlines:`` of a selector) compiled for RE2, a linear-time engine.

A process controls its own command line, so a backtracking engine (Python's ``re``) lets it
stall the worker: ``^(\\w+\\s?)+$`` takes seconds against 24 characters and doubles with every
extra one. RE2 (google-re2) decides any pattern in time linear in the text, at the price of
the features that need backtracking: backreferences, lookaround, atomic groups and possessive
repeats are refused when loading, with a message saying why (docs/policies.md, "Regular
expressions"). The loader, ``remedy check`` and silences added over the control socket all
validate through :func:`compile_cmdline`, so whatever loads is what the engine runs.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

__all__ = ["CmdlinePattern", "RegexError", "compile_cmdline"]

_WHY = (
    "remedy matches command lines with RE2, in time linear in their length, so backreferences, "
    "lookaround, atomic groups and possessive repeats are not supported (docs/policies.md)"
)

# RE2's message prefix -> what to tell the author instead of (or besides) RE2's words.
_HINTS: tuple[tuple[str, str], ...] = (
    ("invalid perl operator: (?=", "lookahead (?=...) is not supported"),
    ("invalid perl operator: (?!", "negative lookahead (?!...) is not supported"),
    ("invalid perl operator: (?<", "lookbehind (?<=...)/(?<!...) is not supported"),
    ("invalid perl operator: (?>", "atomic groups (?>...) are not supported"),
    ("invalid perl operator: (?P=", "backreferences (?P=name) are not supported"),
    ("invalid perl operator: (?P", "backreferences (?P=name) are not supported"),
    ("bad repetition operator: ++", "possessive repeats are not supported"),
    ("bad repetition operator: *+", "possessive repeats are not supported"),
    ("bad repetition operator: ?+", "possessive repeats are not supported"),
    ("invalid escape sequence: \\Z", "write \\z for the end of the text (RE2 has no \\Z)"),
)
_TOO_LARGE = (
    "it needs more than RE2's memory budget (8 MiB per pattern): use fewer or smaller counted "
    "repeats, e.g. [^ ]+ instead of \\pL{1,500}"
)


class RegexError(ValueError):
    """A ``cmdlines`` pattern RE2 cannot compile; the message is a finished sentence."""


class CmdlinePattern:
    """One compiled ``cmdlines`` regex: :meth:`search` is linear in the command line."""

    __slots__ = ("_compiled", "pattern")

    def __init__(self, pattern: str, compiled: Any) -> None:
        self.pattern = pattern
        self._compiled = compiled

    def search(self, text: str) -> bool:
        """True when the pattern is found anywhere in ``text`` (like ``re.search``)."""
        # Command lines are decoded with surrogateescape (remedy.proc): an argument that is not
        # UTF-8 holds lone surrogates, which re2's own str encoding would raise on. Its bytes
        # go to RE2 as they are; an invalid byte matches no character class.
        return self._compiled.search(text.encode("utf-8", "surrogateescape")) is not None

    def __repr__(self) -> str:
        return f"CmdlinePattern({self.pattern!r})"


def _options() -> Any:
    options = re2.Options()
    # RE2 logs every refused pattern to stderr through absl; the error is reported once, by us.
    options.log_errors = False
    return options


def _hint(message: str) -> str:
    escape = message.removeprefix("invalid escape sequence: \\")
    if escape != message and escape[:1].isdigit():
        return f"backreferences (\\{escape[:1]}) are not supported: {_WHY}"
    for prefix, hint in _HINTS:
        if message.startswith(prefix):
            return f"{hint}: {_WHY}"
    if message.startswith("pattern too large"):
        return _TOO_LARGE
    if message.startswith(("invalid perl operator", "invalid escape sequence: \\")):
        # (?x), (?u)...: features RE2 does not have at all.
        return _WHY
    return ""


@functools.lru_cache(maxsize=256)
def compile_cmdline(pattern: str) -> CmdlinePattern:
    """``pattern`` compiled for RE2, or RegexError saying what is wrong and why.

    Cached: a selector compiles its patterns when it is built, and the loader, the control
    socket and ``remedy explain`` build selectors from the same few patterns.
    """
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as err:
        raw = err.args[0] if err.args else ""
        message = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        hint = _hint(message)
        detail = f"{message}; {hint}" if hint else message
        raise RegexError(f"invalid regular expression {pattern!r}: {detail}") from None
    except (TypeError, UnicodeEncodeError) as err:  # a lone surrogate cannot be UTF-8
        raise RegexError(f"invalid regular expression {pattern!r}: {err}") from None
    return CmdlinePattern(pattern, compiled)
