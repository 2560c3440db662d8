"""Where decisions go: an append-only, hash-chained, rotated JSON-lines audit file and the console.

Every line carries ``seq`` (its number, counted across rotations) and ``prev`` (the hex SHA-256 of
the previous line's exact bytes, newline excluded), so an edited, deleted or reordered line breaks
the chain; :mod:`remedy.tools.auditquery` verifies it. A step that can end a process is written
ahead as an ``intent`` and the step is refused when the intent cannot be stored. Format and
guarantees: docs/audit.md.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from remedy.engine.decisions import INTENT, AuditUnavailable, Decision, DecisionSink, writes_ahead

__all__ = [
    "AUDIT_GAP",
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "GENESIS",
    "REOPENED",
    "TORN_LINE",
    "UNFINISHED_INTENT",
    "AuditLog",
    "AuditStats",
    "ConsoleSink",
    "FanOut",
    "line_hash",
    "rotated_paths",
]

from remedy.auditformat import (
    AUDIT_GAP,
    DEFAULT_KEEP,
    DEFAULT_MAX_BYTES,
    GENESIS,
    REOPENED,
    TORN_LINE,
    UNFINISHED_INTENT,
    line_hash,
    rotated_paths,
)

log = logging.getLogger(__name__)

_TAIL_CHUNK = 64 * 1024
# O_NOFOLLOW: the agent runs as root; a symlink planted at the audit path must not make it
# append to (or chmod) whatever the link names.
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_MODE = 0o600

Write = Callable[[int, bytes], int]
Sync = Callable[[int], None]
# What pairs an intent with its outcome: the next decision about the same offender and step.
_IntentKey = tuple[str, int, int, int]


def _tail(path: Path) -> tuple[bytes | None, bytes]:
    """The last complete line of ``path`` (None if there is none) and any torn bytes after it
    (a last line without its newline: the writer died mid-line). Never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, b""
    with os.fdopen(fd, "rb") as f:
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
    if b"\n" not in data:
        return None, data
    end = data.rfind(b"\n")
    torn = data[end + 1 :]
    start = data.rfind(b"\n", 0, end) + 1
    return data[start:end], torn


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _chain_state(raw: bytes) -> tuple[int, str]:
    """(seq, hash) of a chained line; a line without ``seq`` (written before the chain existed)
    still anchors the chain by its hash."""
    seq = _parse(raw).get("seq")
    return (seq if isinstance(seq, int) else 0), line_hash(raw)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"ts": now.isoformat(timespec="milliseconds"), "time": now.timestamp()}


def _why(err: Exception) -> str:
    return (err.strerror if isinstance(err, OSError) else None) or str(err)


def _intent_key(data: dict[str, Any]) -> _IntentKey:
    return (data["policy"], data["pid"], data["start_ticks"], data["step"])


@dataclass
class AuditStats:
    """What the audit log went through, for the agent to expose (metrics, ``/readyz``)."""

    lines: int = 0  # chained lines written by this writer
    failed_writes: int = 0  # writes that failed and were truncated back
    lost: int = 0  # decisions that could not be written (each gap then gets an audit-gap entry)
    refused_intents: int = 0  # intents not stored: their irreversible step did not run
    reopened: int = 0  # external rotations, truncations or removals followed
    mode_fixed: int = 0  # files found with a mode other than 0600 and fixed


@dataclass
class _Gap:
    """Decisions lost while the file could not be written, reported once it can."""

    error: str
    first: float
    last: float
    outcomes: Counter[str] = field(default_factory=Counter)
    intents: list[int] = field(default_factory=list)  # intents whose outcome was lost
    refused: int = 0  # intents not written, so their steps were refused

    def entry(self) -> dict[str, Any]:
        lost = sum(self.outcomes.values())
        return {
            "event": AUDIT_GAP,
            **_now(),
            "lost": lost,
            "lost_outcomes": dict(sorted(self.outcomes.items())),
            "lost_from": self.first,
            "lost_to": self.last,
            "intents": self.intents,
            "refused_intents": self.refused,
            "message": f"{lost} decision(s) could not be written to the audit and "
            f"{self.refused} irreversible step(s) were refused: {self.error}",
        }


class AuditLog:
    """One JSON object per line, written and fsynced per decision: after a crash the audit still
    says what was done. The file is 0600 because it names processes and command lines: created
    so, and fixed to it when found otherwise; a symlink at the path is refused.

    Lines are hash-chained (``seq``, ``prev``). When a line would take the file past ``max_bytes``
    the file is rotated first: ``audit.jsonl`` → ``audit.jsonl.1`` (``.1`` → ``.2`` …, ``keep``
    files kept), and the new file continues the chain. Reopening continues the chain from the last
    line on disk; a torn last line is closed off and reported by a ``torn-line`` entry.

    A write that fails is cut back off the file (``ftruncate`` to the size before it), so the
    file never keeps a fragment and the chain stays valid. A decision that cannot be written is
    logged and counted and reported by an ``audit-gap`` entry once the file takes lines again;
    an :data:`INTENT` that cannot be written raises :class:`AuditUnavailable`, which is how the
    engine refuses the irreversible step it announces. Before each write the path is checked
    against the open file: a rename (logrotate ``create``), a removal or a truncation
    (``copytruncate``) is followed by reopening, and the chain carries on in the new file.

    ``write`` and ``fsync`` are the system calls, injectable so tests can fail them."""

    #: Intents are written ahead of the steps they announce (see :func:`writes_ahead`).
    write_ahead = True

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        write: Write = os.write,
        fsync: Sync = os.fsync,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"audit max_bytes must be positive, got {max_bytes}")
        if keep < 1:
            raise ValueError(f"audit keep must be at least 1, got {keep}")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.stats = AuditStats()
        self._write_fn = write
        self._fsync_fn = fsync
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        self._pending: list[dict[str, Any]] = []  # events to write ahead of the next line
        self._prefix = b""  # the newline that closes a torn fragment, written with them
        self._intents: dict[_IntentKey, int] = {}  # intents written, awaiting their outcome
        self._gap: _Gap | None = None
        self._truncate_to: int | None = None  # a cut-back that itself failed: retried first
        self._healthy = True  # the last write went through
        self._fd = self._open()
        try:
            last, torn = _tail(path)
            if last is None:
                # No complete line: a fresh chain, or a crash between a rotation and its first
                # line.
                last, _ = _tail(path.with_name(path.name + ".1"))
        except OSError as err:
            os.close(self._fd)
            raise self._unavailable("cannot read the audit log's last line", err) from err
        self._size = os.fstat(self._fd).st_size
        if torn:
            self._recover(torn)
        if last is not None:
            self._seq, self._prev = _chain_state(last)
            self._unfinished(_parse(last))
        with self._lock:
            self._flush_pending()

    # -- public ---------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the last write went through (the agent's readiness: the audit is writable)."""
        return self._healthy

    def record(self, decision: Decision) -> None:
        """Append one decision as a chained line, fsynced before returning. A decision that
        cannot be written is logged and counted; an intent raises :class:`AuditUnavailable`."""
        data = decision.to_json()
        with self._lock:
            key = _intent_key(data)
            intent = None if decision.outcome == INTENT else self._intents.pop(key, None)
            if intent is not None:
                data["intent"] = intent  # this line is that intent's outcome
            try:
                seq = self._commit(data, rotate=True)
            except (OSError, AuditUnavailable) as err:
                self._lost(decision, err, intent)
                if decision.outcome == INTENT:
                    self.stats.refused_intents += 1
                    log.error(
                        "audit %s unwritable: refusing %s of pid %d (policy %s): %s",
                        self.path,
                        decision.action,
                        decision.pid,
                        decision.policy,
                        err,
                    )
                    raise AuditUnavailable(
                        f"the intent could not be written to the audit {self.path} "
                        f"({_why(err)}); an irreversible step never runs unrecorded",
                        pid=decision.pid,
                        cgroup=decision.cgroup,
                        policy=decision.policy,
                    ) from err
                return
            self._written()
            if decision.outcome == INTENT:
                self._intents[key] = seq

    def flush(self) -> bool:
        """Write what waits (an ``audit-gap`` entry, a ``reopened`` entry) without a decision,
        so the file can be found writable again between decisions. True when it is."""
        with self._lock:
            return self._flush_pending()

    def close(self) -> None:
        """Close the file; records after this fail."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- opening and following the file -----------------------------------------------------------

    def _unavailable(self, what: str, err: OSError) -> AuditUnavailable:
        return AuditUnavailable(f"{what}: {_why(err)}")

    def _open(self) -> int:
        """Open (or create) the live file for appending: never through a symlink, only a
        regular file, and 0600 whatever mode it was found with."""
        try:
            fd = os.open(self.path, _OPEN_FLAGS, _MODE)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise AuditUnavailable(
                    f"the audit log {self.path} is a symlink: refused (an agent running as root "
                    "must not write where a link points)"
                ) from err
            raise self._unavailable(f"cannot open the audit log {self.path}", err) from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AuditUnavailable(f"the audit log {self.path} is not a regular file")
            if stat.S_IMODE(st.st_mode) != _MODE:
                os.fchmod(fd, _MODE)
                self.stats.mode_fixed += 1
                log.warning(
                    "audit log %s had mode %o: set to 0600 (it names processes and command lines)",
                    self.path,
                    stat.S_IMODE(st.st_mode),
                )
        except OSError as err:
            os.close(fd)
            raise self._unavailable(f"cannot secure the audit log {self.path}", err) from err
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _follow(self) -> None:
        """Make sure the next line goes to the file at ``path``, where this writer left it.
        Someone else may have renamed it away (logrotate ``create``), removed it, or cut it
        (logrotate ``copytruncate``): reopen, and say so in the new file; the chain carries on
        from the last line written, which is in the file that was moved or copied."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "the audit log is closed")
        try:
            at_path = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            at_path = None
        mine = os.fstat(self._fd)
        if at_path is None or (at_path.st_dev, at_path.st_ino) != (mine.st_dev, mine.st_ino):
            how = "moved or removed" if at_path is None else "replaced"
            fd = self._open()
            os.close(self._fd)
            self._fd = fd
            self._size = os.fstat(fd).st_size
            # A fragment waiting to be closed is in the file that was moved: it stays as it is.
            self._prefix = b""
            self._pending = [e for e in self._pending if e.get("event") != TORN_LINE]
            self._noted(how)
        elif mine.st_size != self._size:
            how = "truncated" if mine.st_size < self._size else "appended to"
            self._size = mine.st_size
            self._noted(how)

    def _noted(self, how: str) -> None:
        """The file changed under the writer: an entry says so, and a torn end is closed off."""
        self.stats.reopened += 1
        log.warning("audit log %s was %s from outside: following it", self.path, how)
        self._pending.append(
            {
                "event": REOPENED,
                **_now(),
                "how": how,
                "message": f"the audit file was {how} by someone else; the chain continues "
                "from the last line this writer wrote",
            }
        )
        if self._size > 0:
            _, torn = _tail(self.path)
            if torn:
                self._recover(torn)

    # -- writing --------------------------------------------------------------------------------

    def _recover(self, torn: bytes) -> None:
        """Close a torn line with a newline and say so. The fragment stays in the file (it is
        evidence) but outside the chain: the entry chains from the last good line and names the
        fragment's hash, which is how ``remedy audit --verify`` knows to step over it."""
        self._prefix = b"\n"
        # First: --verify steps over a fragment only when its torn-line entry comes right after.
        self._pending.insert(
            0,
            {
                "event": TORN_LINE,
                **_now(),
                "torn_bytes": len(torn),
                "torn_sha256": line_hash(torn),
                "message": f"torn last line ({len(torn)} bytes, no newline) left out of the chain",
            },
        )

    def _unfinished(self, last: dict[str, Any]) -> None:
        """The last line on disk is an intent: the writer before this one stopped between an
        irreversible step's intent and its outcome. Say so (the step may or may not have run)."""
        if last.get("outcome") != INTENT or "event" in last:
            return
        what = f"{last.get('action')} of pid {last.get('pid')} ({last.get('comm')})"
        message = (
            f"the agent stopped after the intent {last.get('seq')} ({what}, policy "
            f"{last.get('policy')}) and before its outcome: it may or may not have happened"
        )
        log.warning("audit log %s: %s", self.path, message)
        self._pending.append(
            {"event": UNFINISHED_INTENT, **_now(), "intent": last.get("seq"), "message": message}
        )

    def _head(self) -> list[dict[str, Any]]:
        """Entries to write before the next line: events waiting, and a gap to report."""
        return [*self._pending, *([self._gap.entry()] if self._gap else [])]

    def _flush_pending(self) -> bool:
        if not self._head():
            return True
        try:
            self._commit(None, rotate=False)
        except (OSError, AuditUnavailable) as err:
            self.stats.failed_writes += 1  # counted; the entries stay pending
            self._down(err)
            return False
        self._written()
        return True

    def _commit(self, data: dict[str, Any] | None, *, rotate: bool) -> int:
        """Chain what waits (events, a gap) and ``data`` and write them with one write and one
        fsync; returns the ``seq`` of the last line. On failure the file is cut back to where it
        was and nothing advances."""
        if self._truncate_to is not None:
            os.ftruncate(self._fd, self._truncate_to)
            self._size, self._truncate_to = self._truncate_to, None
        self._follow()  # first: what it finds is said in the file the line goes to
        entries = [*self._head(), *([] if data is None else [data])]
        seq, prev = self._seq, self._prev
        lines = []
        for entry in entries:
            seq += 1
            raw = json.dumps(
                {**entry, "seq": seq, "prev": prev}, sort_keys=True, ensure_ascii=False
            )
            line = raw.encode("utf-8")
            prev = line_hash(line)
            lines.append(line)
        payload = self._prefix + b"".join(line + b"\n" for line in lines)
        # Not while a fragment waits to be closed: it must be closed in the file it is in.
        full = self._size > 0 and self._size + len(payload) > self.max_bytes
        if rotate and full and not self._prefix:
            self._rotate()
        self._write(payload)
        self._seq, self._prev, self._prefix = seq, prev, b""
        self.stats.lines += len(lines)
        return seq

    def _write(self, payload: bytes) -> None:
        before = self._size
        try:
            # One write per batch: O_APPEND keeps it whole against other appenders.
            written = 0
            while written < len(payload):
                n = self._write_fn(self._fd, payload[written:])
                if n <= 0:
                    raise OSError(errno.EIO, "write wrote nothing")
                written += n
            self._fsync_fn(self._fd)
        except OSError:
            self._cut_back(before)
            raise
        self._size = before + len(payload)

    def _cut_back(self, size: int) -> None:
        """Remove a failed write's bytes: a fragment would have the next line appended to it.
        Cutting needs no free space; if it fails all the same it is retried before any write."""
        try:
            os.ftruncate(self._fd, size)
            self._fsync_fn(self._fd)
        except OSError as err:
            self._truncate_to = size
            log.critical("audit log %s: cannot cut a failed write back: %s", self.path, err)

    def _rotate(self) -> None:
        """Shift ``.N-1`` → ``.N`` … ``.1`` → ``.2``, the live file → ``.1`` (the oldest beyond
        ``keep`` is overwritten), fsync the directory so the renames survive a crash, start anew.
        Renames keep the 0600 mode. The chain state is in memory and simply carries on. The old
        descriptor is closed only once the new file is open, so a failure leaves one to use."""
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        _fsync_dir(self.path.parent)
        fd = self._open()
        os.close(self._fd)
        self._fd = fd
        self._size = 0
        _fsync_dir(self.path.parent)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _lost(self, decision: Decision, err: Exception, intent: int | None) -> None:
        self.stats.failed_writes += 1
        self._down(err)
        gap = self._gap or _Gap(_why(err), decision.time, decision.time)
        gap.last = decision.time
        if decision.outcome == INTENT:
            gap.refused += 1  # not a lost decision: its step did not run (refused_intents)
        else:
            self.stats.lost += 1
            gap.outcomes[decision.outcome] += 1
        if intent is not None:
            gap.intents.append(intent)
        self._gap = gap

    def _down(self, err: Exception) -> None:
        if self._healthy:
            self._healthy = False
            log.error(
                "audit log %s cannot be written (%s): steps that can end a process are refused "
                "until it can; other decisions go on and are counted as lost",
                self.path,
                _why(err),
            )

    def _written(self) -> None:
        if self._gap is not None:
            log.warning(
                "audit log %s writable again; %d decision(s) were lost",
                self.path,
                sum(self._gap.outcomes.values()),
            )
        self._pending, self._gap, self._healthy = [], None, True


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
    """Sends each decision to several sinks; an intent only to those that write ahead.

    Every sink gets its decision even when one refuses an intent; the refusal is raised after,
    so the engine refuses the step."""

    def __init__(self, sinks: Iterable[DecisionSink]) -> None:
        self._sinks = tuple(sinks)
        self._ahead = tuple(s for s in self._sinks if writes_ahead(s))

    @property
    def write_ahead(self) -> bool:
        """True when a sink takes intents: only then does the engine announce a step."""
        return bool(self._ahead)

    def record(self, decision: Decision) -> None:
        refused: AuditUnavailable | None = None
        failed: Exception | None = None
        for sink in self._ahead if decision.outcome == INTENT else self._sinks:
            try:
                sink.record(decision)
            except AuditUnavailable as err:
                refused = refused or err
            except Exception as err:
                # One sink's fault (the console's stdout gone: EPIPE) must not keep the
                # decision from the others, above all from the audit, whose intent it answers.
                log.exception("decision sink %r failed", sink)
                failed = failed or err
        if refused is not None:
            raise refused
        if failed is not None:
            raise failed
