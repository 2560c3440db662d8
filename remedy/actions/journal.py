"""The undo journal: every reversible change is made durable *before* it is applied.

One JSON object per line, appended, flushed and fsynced per entry (like the audit log):

    {"op": "apply",   "record": {...UndoRecord...}, "at": wall}
    {"op": "revert",  "id": ..., "reason": ..., "outcome": ..., "at": wall[, "detail": ...]}
    {"op": "abandon", "id": ..., "reason": ..., "at": wall}
    {"op": "revert-failed", "id": ..., "reason": ..., "error": ..., "attempt": n, "at": wall,
     "boot_id": ..., "boottime": ...}

A record carries the boot id and CLOCK_BOOTTIME at its creation (:mod:`remedy.actions.boot`):
its TTL, and a failed revert's retry delay, run on that clock within that boot; a record from
another boot is closed as gone (outcome "gone"): the reboot took its change away.

A record is *active* from its "apply" line until a "revert" or "abandon" line closes it;
"revert-failed" leaves it active, so it is retried, and counts the attempts
(:meth:`Journal.failures`). Replaying the file gives the same active set every time, which is
what lets a restarted agent reconcile a crashed run: nothing stays throttled forever, and
nothing is reverted twice. See docs/undo.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from remedy.actions.boot import Boot, Now, boot_for
from remedy.actions.undo import UndoRecord
from remedy.clock import Clock
from remedy.errors import RemedyError

__all__ = [
    "Journal",
    "JournalBusy",
    "JournalError",
    "RevertFailure",
    "reconcile",
    "retry_delay",
    "retry_wait",
]

log = logging.getLogger(__name__)

REASON_TTL_AFTER_RESTART = "ttl expired after restart"
REASON_AGENT_RESTART = "agent restart"
REASON_OTHER_BOOT = "made before a reboot"

LOCK_WAIT_S = 5.0
"""How long opening waits for the lock: a ``remedy reconcile`` pass (which never waits) may hold
it for a moment just as an agent starts; another agent holds it for good."""

COMPACT_AFTER = 1024
"""Lines that compaction would drop (closed records, superseded failure lines) past which the
journal compacts itself: the file stays within this many lines beyond the live ones."""

RETRY_FIRST_S = 5.0
"""The wait before retrying a revert that failed; doubled per failure up to :data:`RETRY_MAX_S`."""
RETRY_MAX_S = 300.0


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failure of one record's revert."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** max(0, attempts - 1))


class JournalError(RemedyError):
    """The journal could not be opened, locked or written; the message names the file."""


class JournalBusy(JournalError):
    """Another process (a running agent) holds the journal's lock: it owns the records."""


@dataclass(frozen=True)
class RevertFailure:
    """Why an active record is still applied: its reverts failed ``attempts`` times (counted
    from the file, so across restarts), the last at ``at`` (wall) with ``error``."""

    attempts: int
    error: str
    reason: str
    at: float
    boot_id: str = ""  # the boot and CLOCK_BOOTTIME of the failure: the retry delay runs there
    boottime: float | None = None


def retry_wait(why: RevertFailure, now: Now) -> float:
    """Seconds left before a failed revert may be tried again (0: now). Measured from the
    failure on CLOCK_BOOTTIME within its boot, otherwise on wall time; a wall clock that went
    back past the failure does not hold the retry off for longer than the delay."""
    delay = retry_delay(why.attempts)
    if why.boot_id and why.boot_id == now.boot_id and why.boottime is not None:
        elapsed = now.boottime - why.boottime
    else:
        elapsed = now.wall - why.at
        if elapsed < 0:
            return 0.0
    return max(0.0, delay - elapsed)


class Journal:
    """The append-only undo journal at ``path``.

    Opening takes an exclusive ``flock`` on the file (:class:`JournalBusy` when another process
    still holds it after ``lock_wait_s``), so two agents never own, and so never revert, the
    same records; then replays it (a torn last line from a crash is dropped with a warning) and
    compacts it when it holds closed records. It compacts itself again whenever
    ``compact_after`` lines could be dropped. The file is created 0600 (it names processes and
    cgroups), its parent directory 0700. ``boot`` gives the boot id and CLOCK_BOOTTIME that
    records are stamped with (by default the system's for the system clock, none for a fake
    one). Methods are thread-safe.
    """

    def __init__(
        self,
        path: Path,
        clock: Clock,
        *,
        boot: Boot | None = None,
        compact_after: int = COMPACT_AFTER,
        lock_wait_s: float = LOCK_WAIT_S,
    ) -> None:
        self.path = path
        self._clock = clock
        self._boot = boot if boot is not None else boot_for(clock)
        self._compact_after = compact_after
        self._lines = 0  # complete lines in the file, live or not
        # Lines this version cannot read (a newer version's record, damage): compacting would
        # delete them, and with them perhaps the only way to take a change back.
        self._foreign_lines = 0
        self._lock = threading.Lock()
        self._active: dict[str, UndoRecord] = {}
        self._applied_at: dict[str, float] = {}
        self._closed_ids: set[str] = set()
        self._closed_lines = 0
        self._failures: dict[str, RevertFailure] = {}
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = self._open_waiting(path, lock_wait_s)
        except OSError as err:
            raise JournalError(f"cannot open undo journal {path}: {err}") from err
        try:
            self._replay()
        except OSError as err:
            os.close(self._fd)
            raise JournalError(f"cannot read undo journal {path}: {err}") from err
        # A compaction that crashed before its rename left the tmp file; the journal itself is
        # intact (the rename is the commit point), so the leftover is garbage.
        with contextlib.suppress(FileNotFoundError):
            self._tmp_path().unlink()
        if self._dead_lines():
            self._compact_quietly()  # on start

    # -- reading ------------------------------------------------------------------------------

    def active(self) -> list[UndoRecord]:
        """Records applied and neither reverted nor abandoned, in apply order."""
        with self._lock:
            return list(self._active.values())

    def now(self) -> Now:
        """The present on the journal's clocks, to judge TTLs and retry delays with."""
        return Now(self._clock.wall(), self._boot.boot_id(), self._boot.boottime())

    def due(self, now: Now | None = None) -> list[UndoRecord]:
        """Active records of this boot (or of no known boot) whose TTL has passed, in apply
        order (:meth:`UndoRecord.expired`)."""
        at = now or self.now()
        return [r for r in self.active() if not r.other_boot(at) and r.expired(at)]

    def other_boot(self, now: Now | None = None) -> list[UndoRecord]:
        """Active records made in another boot, in apply order: gone with the reboot."""
        at = now or self.now()
        return [r for r in self.active() if r.other_boot(at)]

    def for_offender(self, pid: int, start_ticks: int) -> list[UndoRecord]:
        """Active records made against the process (pid, start_ticks): its identity, not its pid."""
        return [r for r in self.active() if r.pid == pid and r.start_ticks == start_ticks]

    def for_policy(self, policy: str) -> list[UndoRecord]:
        """Active records made by ``policy``."""
        return [r for r in self.active() if r.policy == policy]

    def failures(self) -> dict[str, RevertFailure]:
        """Active records whose last revert attempts failed (id -> why): the changes remedy
        could not take back. Status and metrics read this; a record leaves it when closed."""
        with self._lock:
            return dict(self._failures)

    @property
    def closed_entries(self) -> int:
        """How many records in the file are closed: the agent compacts on start when many are."""
        with self._lock:
            return self._closed_lines

    # -- writing ------------------------------------------------------------------------------

    def begin(self, record: UndoRecord) -> UndoRecord:
        """Make ``record`` durable, stamped with this boot and CLOCK_BOOTTIME (the clock its TTL
        runs on), and return it as stamped. Call it *before* applying the change it describes;
        when this returns the apply line is on disk. Raises ValueError for an id already
        journaled (ids are never reused, or a closed record could be reopened) and JournalError
        if the write fails, in which case the caller must not apply the change."""
        with self._lock:
            if record.id in self._active or record.id in self._closed_ids:
                raise ValueError(f"undo record {record.id} is already in {self.path}")
            boot_id = self._boot.boot_id()
            if boot_id and not record.boot_id:
                record = replace(record, boot_id=boot_id, boottime=self._boot.boottime())
            at = self._clock.wall()
            self._append({"op": "apply", "record": record.to_json(), "at": at})
            self._active[record.id] = record
            self._applied_at[record.id] = at
            return record

    def reverted(
        self,
        record_id: str,
        reason: str,
        outcome: str = "reverted",
        *,
        detail: str | None = None,
    ) -> bool:
        """Close an active record as reverted. Returns False, and writes nothing, when the id is
        unknown or already closed: that is how a second revert is refused."""
        entry: dict[str, Any] = {"op": "revert", "id": record_id, "reason": reason}
        entry["outcome"] = outcome
        if detail is not None:
            entry["detail"] = detail
        return self._close(record_id, entry)

    def abandon(self, record_id: str, reason: str) -> bool:
        """Close an active record whose apply failed: the change never happened, nothing to undo.
        Returns False for an unknown or already-closed id."""
        return self._close(record_id, {"op": "abandon", "id": record_id, "reason": reason})

    def failed(self, record_id: str, reason: str, error: str) -> bool:
        """Note a revert attempt that failed. The record stays active and is retried; the line
        tells the operator why it is still there and counts the attempts (:meth:`failures`).
        False for an unknown or closed id."""
        with self._lock:
            if record_id not in self._active:
                return False
            before = self._failures.get(record_id)
            attempts = 1 + (before.attempts if before else 0)
            boot_id = self._boot.boot_id()
            why = RevertFailure(
                attempts,
                error,
                reason,
                self._clock.wall(),
                boot_id,
                self._boot.boottime() if boot_id else None,
            )
            self._append(_failure_entry(record_id, why))
            self._failures[record_id] = why
        self._compact_when_past_bound()
        return True

    def compact(self) -> None:
        """Rewrite the file with only the active records' apply lines, atomically: a tmp file is
        written and fsynced, renamed over the journal, and the directory fsynced. A crash before
        the rename leaves the old journal intact; after it, the new one is complete."""
        with self._lock:
            self._compact_locked()

    def _compact_locked(self) -> None:
        tmp = self._tmp_path()
        try:
            fd = self._open_locked(tmp, truncate=True)
        except OSError as err:
            raise JournalError(f"cannot compact undo journal {self.path}: {err}") from err
        try:
            lines = [
                _encode({"op": "apply", "record": r.to_json(), "at": self._applied_at[i]})
                for i, r in self._active.items()
            ]
            # A record still failing keeps its count of attempts.
            lines += [_encode(_failure_entry(i, why)) for i, why in self._failures.items()]
            _write_all(fd, b"".join(lines))
            os.fsync(fd)
            os.replace(tmp, self.path)  # the commit point
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise JournalError(f"cannot compact undo journal {self.path}: {err}") from err
        # From here the path names the new file: appends must go to it, whatever happens.
        os.close(self._fd)
        self._fd = fd
        self._closed_lines = 0
        self._lines = len(lines)
        self._foreign_lines = 0
        try:
            _fsync_dir(self.path.parent)
        except OSError as err:
            raise JournalError(f"cannot sync directory of {self.path}: {err}") from err

    def close(self) -> None:
        """Release the file and its lock. Idempotent; writing afterwards raises JournalError."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- internals ----------------------------------------------------------------------------

    def _close(self, record_id: str, entry: dict[str, Any]) -> bool:
        with self._lock:
            if record_id not in self._active:
                return False
            self._append({**entry, "at": self._clock.wall()})
            del self._active[record_id]
            del self._applied_at[record_id]
            self._failures.pop(record_id, None)
            self._closed_ids.add(record_id)
            self._closed_lines += 1
        self._compact_when_past_bound()
        return True

    def _dead_lines(self) -> int:
        """Lines compaction would drop: closed records and superseded failure lines."""
        return self._lines - len(self._active) - len(self._failures)

    def _compact_when_past_bound(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._dead_lines() >= self._compact_after:
                self._compact_quietly()

    def _compact_quietly(self) -> None:
        """Compact; a failure (a full disk) is logged, not raised: the line that triggered it is
        already durable, and the file is still whole. The next bound crossing tries again. A
        file holding lines this version cannot read is left alone (loudly): only :meth:`compact`,
        called on purpose, drops them."""
        if self._foreign_lines:
            log.warning(
                "%s: not compacted (%d lines): %d line(s) this version cannot read would be lost",
                self.path,
                self._lines,
                self._foreign_lines,
            )
            self._compact_after = self._dead_lines() + self._compact_after
            return
        try:
            self._compact_locked()
        except JournalError as err:
            log.warning("%s (kept as it is, %d lines)", err, self._lines)
            # Try again only after as many lines again, not on every append.
            self._compact_after = self._dead_lines() + self._compact_after

    def _tmp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    @classmethod
    def _open_waiting(cls, path: Path, wait_s: float) -> int:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return cls._open_locked(path)
            except JournalBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _open_locked(path: Path, *, truncate: bool = False) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        for _ in range(10):
            fd = os.open(path, flags | (os.O_TRUNC if truncate else 0), 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The owner's compaction renames a new file over the path, then unlocks the old
                # one: a lock won on the old inode owns nothing. Open the path again.
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)
                    continue
                os.fchmod(fd, 0o600)  # an existing file keeps its mode at open: make it private
            except BlockingIOError as err:
                os.close(fd)
                raise JournalBusy(f"undo journal {path} is in use by another process") from err
            except OSError:
                os.close(fd)
                raise
            return fd
        raise JournalBusy(f"undo journal {path} keeps being replaced by another process")

    def _append(self, entry: dict[str, Any]) -> None:
        """Write one line and fsync it. On failure the file is cut back to its previous length,
        so a half-written line can never be followed (and corrupted) by the next append."""
        if self._fd < 0:
            raise JournalError(f"undo journal {self.path} is closed")
        size = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, _encode(entry))
            os.fsync(self._fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise JournalError(f"cannot write undo journal {self.path}: {err}") from err
        self._lines += 1

    def _replay(self) -> None:
        with open(self._fd, "rb", closefd=False) as f:
            data = f.read()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, as every complete write does
        for number, raw in enumerate(lines, start=1):
            self._apply_line(raw, number)
        if not tail:
            return
        number = len(lines) + 1
        if _parse(tail) is not None:
            # Crashed between the object and its newline: the entry is whole, finish the line.
            self._apply_line(tail, number)
            _write_all(self._fd, b"\n")
        else:
            log.warning(
                "%s:%d: ignoring a torn last line (%d bytes) left by a crash mid-write",
                self.path,
                number,
                len(tail),
            )
            os.ftruncate(self._fd, len(data) - len(tail))
        os.fsync(self._fd)

    def _apply_line(self, raw: bytes, number: int) -> None:
        if not raw.strip():
            return
        self._lines += 1
        entry = _parse(raw)
        if entry is None:
            log.warning("%s:%d: ignoring a line that is not a JSON object", self.path, number)
            self._foreign_lines += 1
            return
        op = entry.get("op")
        try:
            if op == "apply":
                record = UndoRecord.from_json(entry["record"])
                if record.id in self._active or record.id in self._closed_ids:
                    log.warning(
                        "%s:%d: ignoring a second apply of %s", self.path, number, record.id
                    )
                    return
                self._active[record.id] = record
                self._applied_at[record.id] = float(entry.get("at", record.created))
            elif op in ("revert", "abandon"):
                record_id = str(entry["id"])
                if self._active.pop(record_id, None) is not None:
                    del self._applied_at[record_id]
                    self._failures.pop(record_id, None)
                    self._closed_ids.add(record_id)
                    self._closed_lines += 1
            elif op == "revert-failed":
                record_id = str(entry["id"])
                if record_id in self._active:
                    before = self._failures.get(record_id)
                    # "attempt" since per-record retries; older lines count one each.
                    attempts = int(entry.get("attempt", 1 + (before.attempts if before else 0)))
                    boottime = entry.get("boottime")
                    self._failures[record_id] = RevertFailure(
                        attempts,
                        str(entry.get("error", "")),
                        str(entry.get("reason", "")),
                        float(entry.get("at", 0.0)),
                        str(entry.get("boot_id") or ""),
                        None if boottime is None else float(boottime),
                    )
            else:
                log.warning("%s:%d: ignoring unknown op %r", self.path, number, op)
                self._foreign_lines += 1
        except (KeyError, TypeError, ValueError) as err:
            log.warning("%s:%d: ignoring a malformed %r entry: %s", self.path, number, op, err)
            self._foreign_lines += 1


def reconcile(
    journal: Journal,
    revert: Callable[[UndoRecord], str],
    now: Now | None = None,
    *,
    keep_unexpired: bool = True,
) -> list[tuple[UndoRecord, str]]:
    """Settle what a previous run left applied: on the agent's start, before it arms TTLs, and
    by ``remedy reconcile`` while no agent runs.

    A record made in another boot is closed as gone, untouched: the reboot reset its cgroups
    and ended its processes, and what now has its cgroup's name is someone else's. Every other
    active record whose TTL has passed is reverted now. With ``keep_unexpired`` the others stay
    active for the engine to re-arm; without it they are reverted too. A record whose last
    revert failed is retried only once its delay has passed (:func:`retry_wait`, from the file,
    so across restarts): a crash loop or a timer does not add a line per run. ``revert`` undoes
    one record and returns a detail string; each success is journaled as a revert. A revert that
    raises is logged and journaled as "revert-failed" but the record stays active, so it is
    retried, whatever its TTL. Returns (record, detail) for each record handled, a failure's
    detail being ``"revert-failed: <error>"``, a record of another boot's ``"gone: ..."``.
    """
    at = now or journal.now()
    done: list[tuple[UndoRecord, str]] = []
    failures = journal.failures()
    for record in journal.active():
        if record.other_boot(at):
            detail = f"gone: made in boot {record.boot_id}, this is {at.boot_id}"
            journal.reverted(record.id, REASON_OTHER_BOOT, outcome="gone", detail=detail)
            done.append((record, detail))
            continue
        failed = failures.get(record.id)
        if failed is not None:
            # Asked back before (TTL, release, recovery) and refused: due whatever its TTL.
            if retry_wait(failed, at) > 0:
                continue  # backing off: a later run (or the engine's expire) tries again
            reason = f"retry: {failed.reason}"
        elif record.expired(at):
            reason = REASON_TTL_AFTER_RESTART
        elif keep_unexpired:
            continue
        else:
            reason = REASON_AGENT_RESTART
        try:
            detail = revert(record)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            log.warning(
                "undo %s (%s on pid %d, cgroup %s) failed, stays applied and is retried: %s",
                record.id,
                record.action,
                record.pid,
                record.cgroup,
                error,
            )
            journal.failed(record.id, reason, error)
            done.append((record, f"revert-failed: {error}"))
            continue
        journal.reverted(record.id, reason, detail=detail)
        done.append((record, detail))
    return done


def _failure_entry(record_id: str, why: RevertFailure) -> dict[str, Any]:
    return {
        "op": "revert-failed",
        "id": record_id,
        "reason": why.reason,
        "error": why.error,
        "attempt": why.attempts,
        "at": why.at,
        "boot_id": why.boot_id,
        "boottime": why.boottime,
    }


def _encode(entry: dict[str, Any]) -> bytes:
    return (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is (rename(2), fsync(2) NOTES).
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
