"""``remedy audit``: read the audit files in order, filter decisions, verify the hash chain."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from remedy.auditformat import (
    AUDIT_GAP,
    GENESIS,
    TORN_LINE,
    UNFINISHED_INTENT,
    line_hash,
    rotated_paths,
)
from remedy.engine.decisions import INTENT
from remedy.policy.durations import parse_duration

__all__ = [
    "EXIT_BROKEN",
    "EXIT_UNFINISHED",
    "AuditFilter",
    "Break",
    "Report",
    "Unfinished",
    "check",
    "iter_entries",
    "main",
    "parse_since",
    "verify",
]

#: ``remedy audit --verify`` exit status when the chain is broken.
EXIT_BROKEN = 4
#: ``remedy audit --verify`` exit status when the chain is intact but an intent has no outcome.
EXIT_UNFINISHED = 5


def parse_since(text: str, now: float | None = None) -> float:
    """Wall-clock seconds for ``--since``: an ISO 8601 time (naive means UTC) or a duration back
    from now (``"90s"``, ``"15m"``, ``"1h"``). Raises ``ValueError`` naming the text otherwise."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            ago = parse_duration(text)
        except ValueError:
            raise ValueError(
                f"--since: expected an ISO 8601 time or a duration like '1h', got {text!r}"
            ) from None
        return (time.time() if now is None else now) - ago
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass(frozen=True)
class AuditFilter:
    """Which decisions to print; ``None`` matches everything."""

    since: float | None = None
    policy: str | None = None
    outcome: str | None = None
    pid: int | None = None

    def matches(self, entry: dict[str, Any]) -> bool:
        """True for a decision line (not an ``event`` entry) that passes every set criterion."""
        if "event" in entry:
            return False
        when = entry.get("time")
        if self.since is not None and not (isinstance(when, int | float) and when >= self.since):
            return False
        if self.policy is not None and entry.get("policy") != self.policy:
            return False
        if self.outcome is not None and entry.get("outcome") != self.outcome:
            return False
        return self.pid is None or entry.get("pid") == self.pid


def iter_entries(path: Path) -> Iterator[dict[str, Any]]:
    """Every parseable JSON object in the audit files for ``path``, oldest file first. Lines
    that are not JSON objects (a torn fragment) are skipped; ``--verify`` is what reports them."""
    for file in rotated_paths(path):
        with file.open("rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry


@dataclass(frozen=True)
class Break:
    """The first place the chain does not hold: file, 1-based line, what was expected, what was
    found, and why in words."""

    file: Path
    line: int
    expected: str
    found: str
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.reason}\n"
            f"  expected prev {self.expected}\n"
            f"  found    prev {self.found}"
        )


@dataclass(frozen=True)
class Unfinished:
    """An intent with no outcome line: the step it announced may or may not have run."""

    file: Path
    line: int
    seq: int
    entry: dict[str, Any]
    why: str

    def __str__(self) -> str:
        e = self.entry
        return (
            f"{self.file}:{self.line}: unfinished intent (seq {self.seq}, {e.get('ts', '?')}): "
            f"{e.get('action')} of pid {e.get('pid')} ({e.get('comm')}), policy "
            f"{e.get('policy')}: {self.why}"
        )


@dataclass(frozen=True)
class Report:
    """What ``--verify`` found: chained lines checked, the first break, unfinished intents."""

    checked: int
    broken: Break | None
    unfinished: tuple[Unfinished, ...]


class _Intents:
    """Intents seen so far, crossed off by the outcome line that names them (``intent``)."""

    def __init__(self) -> None:
        self.open: dict[int, Unfinished] = {}

    def see(self, file: Path, line: int, entry: dict[str, Any]) -> None:
        seq, event = entry.get("seq"), entry.get("event")
        if event is None and entry.get("outcome") == INTENT and isinstance(seq, int):
            why = "no outcome line follows: the agent stopped between the intent and its outcome"
            self.open[seq] = Unfinished(file, line, seq, entry, why)
        elif event is None and isinstance(entry.get("intent"), int):
            self.open.pop(entry["intent"], None)
        elif event == AUDIT_GAP:
            for intent in entry.get("intents") or ():
                self._annotate(
                    intent,
                    f"its outcome was lost while the audit could not be written "
                    f"(audit-gap, seq {seq})",
                    replace=True,
                )
        elif event == UNFINISHED_INTENT and isinstance(entry.get("intent"), int):
            self._annotate(entry["intent"], f"reported by the next agent (seq {seq})")

    def _annotate(self, intent: object, note: str, *, replace: bool = False) -> None:
        found = self.open.get(intent) if isinstance(intent, int) else None
        if found is not None:
            why = note if replace else f"{found.why}; {note}"
            self.open[found.seq] = Unfinished(found.file, found.line, found.seq, found.entry, why)


def _torn_entry_for(raw_next: bytes, fragment: bytes) -> bool:
    """True when ``raw_next`` is the writer's ``torn-line`` entry naming ``fragment``."""
    try:
        entry = json.loads(raw_next)
    except ValueError:
        return False
    return (
        isinstance(entry, dict)
        and entry.get("event") == TORN_LINE
        and entry.get("torn_sha256") == line_hash(fragment)
    )


def verify(path: Path) -> tuple[int, Break | None]:
    """The chain part of :func:`check`: chained lines checked and the first break, or None."""
    report = check(path)
    return report.checked, report.broken


def check(path: Path) -> Report:
    """Check the chain across ``path``'s rotated files and itself, oldest first: the number of
    chained lines checked, the first :class:`Break` (None when intact), and every intent no
    outcome line answers (up to the break).

    The oldest file present may start anywhere in the chain (older files were rotated away), so
    its first ``prev`` is taken as found; every later line must name the hash of the line before
    it and carry the next ``seq``. A fragment the writer closed off after a crash is stepped over
    only when the very next line is the ``torn-line`` entry naming its hash."""
    intents = _Intents()
    checked, broken = _walk(path, intents)
    return Report(checked, broken, tuple(intents.open.values()))


def _walk(path: Path, intents: _Intents) -> tuple[int, Break | None]:
    expected: str | None = None
    expected_seq: int | None = None
    checked = 0
    for file in rotated_paths(path):
        lines = file.read_bytes().split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, as it must
        for index, raw in enumerate(lines):
            where = (file, index + 1)
            if index + 1 < len(lines) and _torn_entry_for(lines[index + 1], raw):
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("prev"), str):
                return checked, Break(*where, expected or "?", "(none)", "not a chained JSON line")
            found = entry["prev"]
            if expected is not None and found != expected:
                return checked, Break(
                    *where,
                    expected,
                    found,
                    "prev does not match: edited, deleted or reordered line",
                )
            seq = entry.get("seq")
            if expected is None and seq == 1 and found != GENESIS:
                return checked, Break(
                    *where, GENESIS, found, "the first line does not start a chain"
                )
            if expected_seq is not None and seq != expected_seq:
                return checked, Break(
                    *where, expected or "?", found, f"seq {seq} where {expected_seq} was expected"
                )
            expected = line_hash(raw)
            expected_seq = seq + 1 if isinstance(seq, int) else None
            checked += 1
            intents.see(file, index + 1, entry)
        if tail:
            return checked, Break(
                file,
                len(lines) + 1,
                expected or "?",
                "(none)",
                f"last line has no newline ({len(tail)} bytes): truncated, or the writer died "
                "mid-line (remedy closes it off on its next start)",
            )
    return checked, None


def _print_entry(entry: dict[str, Any], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        print(json.dumps(entry, sort_keys=True, ensure_ascii=False), file=out)
        return
    print(
        f"{entry.get('ts', '?')}  {entry.get('policy', '?')}  {entry.get('outcome', '?')}  "
        f"{entry.get('message', '')}",
        file=out,
    )


def _main_verify(path: Path, out: TextIO) -> int:
    report = check(path)
    for unfinished in report.unfinished:
        print(f"warning: {unfinished}", file=out)
    if report.broken is not None:
        print(f"chain broken after {report.checked} good line(s):\n{report.broken}", file=out)
        return EXIT_BROKEN
    intact = f"chain intact, {report.checked} line(s) in {len(rotated_paths(path))} file(s)"
    if report.unfinished:
        print(f"{intact}; {len(report.unfinished)} unfinished intent(s)", file=out)
        return EXIT_UNFINISHED
    print(f"ok: {intact}", file=out)
    return 0


def main(
    path: Path,
    *,
    since: str | None = None,
    policy: str | None = None,
    outcome: str | None = None,
    pid: int | None = None,
    check: bool = False,
    fmt: str = "text",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``remedy audit``. With ``check`` (``--verify``): 0 when the chain is intact,
    :data:`EXIT_BROKEN` when it is broken (the first break printed), :data:`EXIT_UNFINISHED`
    when it is intact but an intent has no outcome (a warning line for each). Otherwise print
    the matching decisions and return 0. A missing audit file is exit 2."""
    out = out or sys.stdout  # looked up per call, so redirections (and pytest's capsys) apply
    err = err or sys.stderr
    if not rotated_paths(path):
        print(f"remedy: no audit file at {path}", file=err)
        return 2
    if check:
        return _main_verify(path, out)
    try:
        cutoff = parse_since(since) if since is not None else None
    except ValueError as error:
        print(f"remedy: {error}", file=err)
        return 2
    wanted = AuditFilter(since=cutoff, policy=policy, outcome=outcome, pid=pid)
    for entry in iter_entries(path):
        if wanted.matches(entry):
            _print_entry(entry, fmt, out)
    return 0
