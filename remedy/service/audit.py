"""Where decisions go: an append-only, hash-chained, rotated JSON-lines audit file and the console.

Every line carries ``seq`` (its number, counted across rotations) and ``prev`` (the hex SHA-256 of
the previous line's exact bytes, newline excluded), so an edited, deleted or reordered line breaks
the chain; :mod:`remedy.service.auditquery` verifies it. Format and guarantees: docs/audit.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from remedy.engine.decisions import Decision, DecisionSink

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "GENESIS",
    "TORN_LINE",
    "AuditLog",
    "ConsoleSink",
    "FanOut",
    "line_hash",
    "rotated_paths",
]

#: ``prev`` of the very first line of a fresh chain.
GENESIS = "0" * 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 5
#: ``event`` of the entry written after a line torn by a crash (see :meth:`AuditLog._recover`).
TORN_LINE = "torn-line"
_TAIL_CHUNK = 64 * 1024


def line_hash(raw: bytes) -> str:
    """The chain hash of one line: hex SHA-256 of its exact bytes, without the newline."""
    return hashlib.sha256(raw).hexdigest()


def rotated_paths(path: Path) -> list[Path]:
    """The audit files present for ``path``, oldest first: ``path.N`` … ``path.1``, ``path``."""
    numbered: list[tuple[int, Path]] = []
    for candidate in path.parent.glob(path.name + ".*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdigit():
            numbered.append((int(suffix), candidate))
    files = [p for _, p in sorted(numbered, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def _tail(path: Path) -> tuple[bytes | None, bytes]:
    """The last complete line of ``path`` (None if there is none) and any torn bytes after it
    (a last line without its newline: the writer died mid-line)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            data = b""
            pos = size
            # Read backwards until the buffer holds the newline *before* the last complete line.
            while pos > 0:
                step = min(_TAIL_CHUNK, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
                body = data[: data.rfind(b"\n")] if b"\n" in data else b""
                if b"\n" in body:
                    break
    except FileNotFoundError:
        return None, b""
    if b"\n" not in data:
        return None, data
    end = data.rfind(b"\n")
    torn = data[end + 1 :]
    start = data.rfind(b"\n", 0, end) + 1
    return data[start:end], torn


def _chain_state(raw: bytes) -> tuple[int, str]:
    """(seq, hash) of a chained line; a line without ``seq`` (written before the chain existed)
    still anchors the chain by its hash."""
    try:
        seq = json.loads(raw).get("seq")
    except (ValueError, AttributeError):
        seq = None
    return (seq if isinstance(seq, int) else 0), line_hash(raw)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """One JSON object per line, written and fsynced per decision: after a crash the audit still
    says what was done. Created 0600 because it names processes and command lines.

    Lines are hash-chained (``seq``, ``prev``). When a line would take the file past ``max_bytes``
    the file is rotated first: ``audit.jsonl`` → ``audit.jsonl.1`` (``.1`` → ``.2`` …, ``keep``
    files kept), and the new file continues the chain. Reopening continues the chain from the last
    line on disk; a torn last line is closed off and reported by a ``torn-line`` entry."""

    def __init__(
        self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"audit max_bytes must be positive, got {max_bytes}")
        if keep < 1:
            raise ValueError(f"audit keep must be at least 1, got {keep}")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        last, torn = _tail(path)
        if last is None:
            # No complete line: a fresh chain, or a crash between a rotation and its first line.
            last, _ = _tail(path.with_name(path.name + ".1"))
        if last is not None:
            self._seq, self._prev = _chain_state(last)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        if torn:
            self._recover(torn)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _recover(self, torn: bytes) -> None:
        """Close a torn line with a newline and say so. The fragment stays in the file (it is
        evidence) but outside the chain: the entry chains from the last good line and names the
        fragment's hash, which is how ``remedy audit --verify`` knows to step over it."""
        self._write(b"\n", rotate=False)
        now = datetime.now(UTC)
        self._append(
            {
                "event": TORN_LINE,
                "ts": now.isoformat(timespec="milliseconds"),
                "time": now.timestamp(),
                "torn_bytes": len(torn),
                "torn_sha256": line_hash(torn),
                "message": f"torn last line ({len(torn)} bytes, no newline) left out of the chain",
            },
            rotate=False,
        )

    def record(self, decision: Decision) -> None:
        """Append one decision as a chained line, fsynced before returning."""
        with self._lock:
            self._append(decision.to_json(), rotate=True)

    def _append(self, data: dict[str, Any], *, rotate: bool) -> None:
        data = {**data, "seq": self._seq + 1, "prev": self._prev}
        raw = json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")
        self._write(raw + b"\n", rotate=rotate)
        self._seq += 1
        self._prev = line_hash(raw)

    def _write(self, payload: bytes, *, rotate: bool) -> None:
        if rotate and self._size > 0 and self._size + len(payload) > self.max_bytes:
            self._rotate()
        # One write per line: O_APPEND keeps it whole against other appenders.
        written = os.write(self._fd, payload)
        while written < len(payload):
            written += os.write(self._fd, payload[written:])
        os.fsync(self._fd)
        self._size += len(payload)

    def _rotate(self) -> None:
        """Shift ``.N-1`` → ``.N`` … ``.1`` → ``.2``, the live file → ``.1`` (the oldest beyond
        ``keep`` is overwritten), fsync the directory so the renames survive a crash, start anew.
        Renames keep the 0600 mode. The chain state is in memory and simply carries on."""
        os.close(self._fd)
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        _fsync_dir(self.path.parent)
        self._fd = self._open()
        self._size = 0
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        """Close the file; records after this fail."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class ConsoleSink:
    """Prints each decision's message as it happens."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out

    def record(self, decision: Decision) -> None:
        mode = "dry-run" if decision.dry_run else "enforce"
        print(
            f"[{decision.policy}] {mode}: {decision.message}",
            file=self._out,
            flush=True,
        )


class FanOut:
    """Sends each decision to several sinks."""

    def __init__(self, sinks: Iterable[DecisionSink]) -> None:
        self._sinks = tuple(sinks)

    def record(self, decision: Decision) -> None:
        for sink in self._sinks:
            sink.record(decision)
