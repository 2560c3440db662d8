"""The audit file's format, shared by the writer (the agent's :mod:`remedy.service.audit`) and
the readers (:mod:`remedy.tools.auditquery`): event names, the chain's genesis, the line hash and
how rotated files are named. Format and guarantees: docs/audit.md."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = [
    "AUDIT_GAP",
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "GENESIS",
    "REOPENED",
    "TORN_LINE",
    "UNFINISHED_INTENT",
    "line_hash",
    "rotated_paths",
]

#: ``prev`` of the very first line of a fresh chain.
GENESIS = "0" * 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 5
#: ``event`` of the entry written after a line torn by a crash (see :meth:`AuditLog._recover`).
TORN_LINE = "torn-line"
#: ``event`` of the entry naming decisions that could not be written while the file was not.
AUDIT_GAP = "audit-gap"
#: ``event`` of the entry written when the file was rotated, truncated or removed from outside.
REOPENED = "reopened"
#: ``event`` of the entry a starting writer adds when the last line it finds is an intent.
UNFINISHED_INTENT = "unfinished-intent"


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
