"""Applies reversible steps through the undo journal, and takes them back.

Every reversible change is journaled (fsync'd) *before* it is applied; a failed apply is
taken back like any revert, since it may have failed half way; a revert is journaled after it
succeeds (reverts are idempotent, so a crash between the two only repeats a harmless revert).
This is what the engine's ``Undo`` hooks call on recovery, TTL expiry, policy removal and
shutdown, and what the agent reconciles on start.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from remedy.actions.base import Action, ActionContext
from remedy.actions.journal import (
    RETRY_FIRST_S,
    RETRY_MAX_S,
    Journal,
    JournalError,
    RevertFailure,
    reconcile,
    retry_delay,
    retry_wait,
)
from remedy.actions.params import ActionParams
from remedy.actions.throttle import Reversible
from remedy.actions.undo import UndoRecord
from remedy.clock import Clock
from remedy.engine.offender import Subject
from remedy.errors import ActionError

__all__ = ["RETRY_FIRST_S", "RETRY_MAX_S", "Undoer", "retry_delay", "reversible"]

log = logging.getLogger(__name__)


def reversible(action: Action) -> Reversible | None:
    """The action as a Reversible when it implements undo/revert."""
    if hasattr(action, "undo") and hasattr(action, "revert"):
        return action  # type: ignore[return-value]
    return None


class Undoer:
    """The journal and the actions' revert, behind the engine's ``Undo`` interface.

    A revert that fails stays open in the journal (never closed as done) and is retried by
    :meth:`expire`, whether or not its TTL has passed, with a delay doubling from 5 s to 5 min
    per failure, measured from the failure's line in the journal (so a restarted agent, or
    ``remedy reconcile``, keeps to it). Explicit requests (release, recovery, policy removal,
    shutdown) try at once. :meth:`stuck` and :attr:`stats` say what could not be taken back,
    for status and metrics.
    """

    def __init__(
        self, journal: Journal, ctx: ActionContext, clock: Clock, actions: dict[str, Action]
    ) -> None:
        self.journal = journal
        self.ctx = ctx
        self._clock = clock
        self._actions = actions
        self.stats: Counter[str] = Counter()

    def apply(
        self,
        action: Action,
        params: ActionParams,
        subject: Subject,
        ctx: ActionContext,
        *,
        policy: str,
        ttl_s: float,
    ) -> str:
        """Run ``action``; when it is reversible, journal its undo record first."""
        undoable = reversible(action)
        if undoable is None:
            return action.run(params, subject, ctx)
        record = undoable.undo(
            params, subject, ctx, policy=policy, ttl_s=ttl_s, now_wall=self._clock.wall()
        )
        try:
            record = self.journal.begin(record)  # stamped with the boot its TTL runs in
        except JournalError as err:
            # Not applied: a change the journal cannot hold would outlive its TTL after a
            # crash. A refusal the engine audits; a JournalError escaping it left the offender
            # half way through its transition, every later record failing (a full disk).
            raise ActionError(
                f"refused: its undo could not be journaled ({err})",
                pid=subject.pid,
                cgroup=subject.cgroup,
                policy=policy,
            ) from err
        try:
            detail = action.run(params, subject, ctx)
        except ActionError as err:
            # A run that failed may have failed half way: the offender moved and a tree member
            # refused, a freeze written that did not settle within its wait (a task in D
            # state). Take it back like any revert (reverts are idempotent and harmless where
            # nothing changed); if that fails too, the record stays open and is retried.
            self.revert(record, f"apply failed: {err}")
            raise
        return f"{detail} (undo {record.id[:8]}, ttl {ttl_s:g} s)"

    def revert(self, record: UndoRecord, reason: str) -> str:
        """Take one record back; a failure stays active in the journal and is retried."""
        try:
            undoable = self._reversible(record)
            if undoable is None:  # a journal from a newer version: nothing we can do, say so
                self.journal.reverted(record.id, reason, outcome="not-reversible")
                return f"{record.action}: not reversible here"
            detail = undoable.revert(record, self.ctx)
        except ActionError as err:
            return self._failed(record, reason, err)
        self.journal.reverted(record.id, reason, detail=detail)
        self.stats["reverted"] += 1
        return f"{record.action} on {record.cgroup}: {detail}"

    def _reversible(self, record: UndoRecord) -> Reversible | None:
        action = self._actions.get(record.action)
        if action is None:
            # A journal written by a newer version (or a removed action): the change may well
            # be applied, so it is never closed as done; it stays stuck, visibly, and a version
            # that knows the action takes it back. Raising KeyError here killed the tick.
            raise ActionError(
                f"undo record names action {record.action!r}, unknown to this version",
                pid=record.pid,
                cgroup=record.cgroup,
                policy=record.policy,
            )
        return reversible(action)

    def _failed(self, record: UndoRecord, reason: str, err: Exception) -> str:
        self.journal.failed(record.id, reason, str(err))
        why = self.journal.failures().get(record.id)
        attempts = why.attempts if why else 1
        delay = retry_delay(attempts)
        self.stats["revert-failed"] += 1
        log.warning(
            "undo %s (%s on pid %d, %s) failed (attempt %d), still applied, retry in %g s: %s",
            record.id,
            record.action,
            record.pid,
            record.cgroup,
            attempts,
            delay,
            err,
        )
        return (
            f"{record.action} on {record.cgroup}: revert failed (attempt {attempts}, "
            f"still applied, retry in {delay:g} s): {err}"
        )

    def stuck(self) -> list[tuple[UndoRecord, RevertFailure]]:
        """Active records whose reverts failed and are being retried, with why."""
        failures = self.journal.failures()
        return [(r, failures[r.id]) for r in self.journal.active() if r.id in failures]

    def _revert_all(self, records: Iterable[UndoRecord], reason: str) -> list[str]:
        # Newest first: a throttle applied after a move is taken back before the move is.
        first: list[Exception] = []
        details = [self._contained(r, reason, first) for r in reversed(list(records))]
        if first:
            raise first[0]
        return details

    def revert_offender(self, subject: Subject, reason: str) -> list[str]:
        return self._revert_all(self.journal.for_offender(subject.pid, subject.start_ticks), reason)

    def revert_policy(self, policy: str, reason: str) -> list[str]:
        return self._revert_all(self.journal.for_policy(policy), reason)

    def expire(self) -> list[str]:
        """Revert what is past its TTL (on CLOCK_BOOTTIME, :meth:`UndoRecord.expired`), and
        retry failed reverts whose delay has passed."""
        at = self.journal.now()
        failures = self.journal.failures()
        details: list[str] = []
        first: list[Exception] = []
        for record in reversed(self.journal.active()):
            failed = failures.get(record.id)
            if record.other_boot(at):
                continue  # only reconcile closes those; none are left once it ran
            if failed is None and not record.expired(at):
                continue
            if failed is not None and retry_wait(failed, at) > 0:
                continue  # backing off, counted from the journal: across restarts too
            if failed is not None:
                self.stats["revert-retried"] += 1
            reason = f"retry: {failed.reason}" if failed else "ttl expired"
            details.append(self._contained(record, reason, first))
        if first:
            raise first[0]  # after every due record was tried (a full journal fails them all)
        return details

    def _contained(self, record: UndoRecord, reason: str, first: list[Exception]) -> str:
        """:meth:`revert`; a journal that cannot take the line (ENOSPC) must not keep the
        records after this one applied past their TTL: the error is kept for the caller."""
        try:
            return self.revert(record, reason)
        except JournalError as err:
            first.append(err)
            return f"{record.action} on {record.cgroup}: reverted, not closed in the journal: {err}"

    def revert_all(self, reason: str) -> list[str]:
        return self._revert_all(self.journal.active(), reason)

    def reconcile(self, *, keep_unexpired: bool = True) -> list[str]:
        """On start (and for ``remedy reconcile``): leftovers of another boot are closed as gone,
        those of a crashed run whose TTL has passed are reverted now; the rest stay active and
        expire on schedule (``keep_unexpired``), or are all reverted. What fails, or failed
        before and is still backing off, stays active and is retried by :meth:`expire` once
        its delay (counted from the journal) has passed."""

        def _revert(record: UndoRecord) -> str:
            undoable = self._reversible(record)
            if undoable is None:
                return "not reversible here"
            return undoable.revert(record, self.ctx)

        at = self.journal.now()
        done = reconcile(self.journal, _revert, at, keep_unexpired=keep_unexpired)
        failures = self.journal.failures()
        for record, _detail in done:
            if record.id in failures:
                self.stats["revert-failed"] += 1
        return [f"{record.action} on {record.cgroup}: {detail}" for record, detail in done]
