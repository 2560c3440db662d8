"""Applies reversible steps through the undo journal, and takes them back.

Every reversible change is journaled (fsync'd) *before* it is applied; a failed apply is
abandoned; a revert is journaled after it succeeds (reverts are idempotent, so a crash between
the two only repeats a harmless revert). This is what the engine's ``Undo`` hooks call on
recovery, TTL expiry, policy removal and shutdown, and what the agent reconciles on start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from remedy.actions.base import Action, ActionContext
from remedy.actions.journal import Journal, reconcile
from remedy.actions.params import ActionParams
from remedy.actions.throttle import Reversible
from remedy.actions.undo import UndoRecord
from remedy.clock import Clock
from remedy.engine.offender import Subject
from remedy.errors import ActionError

log = logging.getLogger(__name__)


def reversible(action: Action) -> Reversible | None:
    """The action as a Reversible when it implements undo/revert."""
    if hasattr(action, "undo") and hasattr(action, "revert"):
        return action  # type: ignore[return-value]
    return None


class Undoer:
    """The journal and the actions' revert, behind the engine's ``Undo`` interface."""

    def __init__(
        self, journal: Journal, ctx: ActionContext, clock: Clock, actions: dict[str, Action]
    ) -> None:
        self.journal = journal
        self.ctx = ctx
        self._clock = clock
        self._actions = actions

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
        self.journal.begin(record)
        try:
            detail = action.run(params, subject, ctx)
        except ActionError as err:
            self.journal.abandon(record.id, f"apply failed: {err}")
            raise
        return f"{detail} (undo {record.id[:8]}, ttl {ttl_s:g} s)"

    def revert(self, record: UndoRecord, reason: str) -> str:
        """Take one record back; a failure stays active in the journal and is retried."""
        undoable = reversible(self._actions[record.action])
        if undoable is None:  # a journal from a newer version: nothing we can do, say so
            self.journal.reverted(record.id, reason, outcome="not-reversible")
            return f"{record.action}: not reversible here"
        try:
            detail = undoable.revert(record, self.ctx)
        except ActionError as err:
            self.journal.failed(record.id, reason, str(err))
            return f"{record.action} on {record.cgroup}: revert failed: {err}"
        self.journal.reverted(record.id, reason, detail=detail)
        return f"{record.action} on {record.cgroup}: {detail}"

    def _revert_all(self, records: Iterable[UndoRecord], reason: str) -> list[str]:
        # Newest first: a throttle applied after a move is taken back before the move is.
        return [self.revert(r, reason) for r in reversed(list(records))]

    def revert_offender(self, subject: Subject, reason: str) -> list[str]:
        return self._revert_all(self.journal.for_offender(subject.pid, subject.start_ticks), reason)

    def revert_policy(self, policy: str, reason: str) -> list[str]:
        return self._revert_all(self.journal.for_policy(policy), reason)

    def expire(self) -> list[str]:
        return self._revert_all(self.journal.due(self._clock.wall()), "ttl expired")

    def revert_all(self, reason: str) -> list[str]:
        return self._revert_all(self.journal.active(), reason)

    def reconcile(self, *, keep_unexpired: bool = True) -> list[str]:
        """On start: leftovers of a crashed run whose TTL has passed are reverted now; the rest
        stay active and expire on schedule (``keep_unexpired``), or are all reverted."""

        def _revert(record: UndoRecord) -> str:
            undoable = reversible(self._actions[record.action])
            if undoable is None:
                return "not reversible here"
            return undoable.revert(record, self.ctx)

        done = reconcile(self.journal, _revert, self._clock.wall(), keep_unexpired=keep_unexpired)
        return [f"{record.action} on {record.cgroup}: {detail}" for record, detail in done]
