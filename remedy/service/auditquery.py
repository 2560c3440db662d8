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

from remedy.policy.durations import parse_duration
from remedy.service.audit import GENESIS, TORN_LINE, line_hash, rotated_paths

__all__ = [
    "EXIT_BROKEN",
    "AuditFilter",
    "Break",
    "iter_entries",
    "main",
    "parse_since",
    "verify",
]

#: ``remedy audit --verify`` exit status when the chain is broken.
EXIT_BROKEN = 4


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
    """Check the chain across ``path``'s rotated files and itself, oldest first. Returns the
    number of chained lines checked and the first :class:`Break`, or None when intact.

    The oldest file present may start anywhere in the chain (older files were rotated away), so
    its first ``prev`` is taken as found; every later line must name the hash of the line before
    it and carry the next ``seq``. A fragment the writer closed off after a crash is stepped over
    only when the very next line is the ``torn-line`` entry naming its hash."""
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
    :data:`EXIT_BROKEN` when it is broken, the first break printed. Otherwise print the matching
    decisions and return 0. A missing audit file is exit 2."""
    out = out or sys.stdout  # looked up per call, so redirections (and pytest's capsys) apply
    err = err or sys.stderr
    if not rotated_paths(path):
        print(f"remedy: no audit file at {path}", file=err)
        return 2
    if check:
        checked, broken = verify(path)
        if broken is not None:
            print(f"chain broken after {checked} good line(s):\n{broken}", file=out)
            return EXIT_BROKEN
        print(
            f"ok: chain intact, {checked} line(s) in {len(rotated_paths(path))} file(s)", file=out
        )
        return 0
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
