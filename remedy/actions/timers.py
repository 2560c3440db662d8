"""Deferred escalations: a terminate's grace period as a due time the worker's tick checks.

The worker thread decides every record and feeds the systemd watchdog, so it never sleeps out a
grace period. A terminate sends SIGTERM, hands an :class:`Escalation` to :class:`Timers`, and
returns; each engine tick then polls the escalation (never blocking) until every target has
exited or the grace is over, when the survivors get SIGKILL. Only the worker thread calls any
of this: no other thread ever signals.

Pinning: an escalation owns a *duplicate* of each target's pidfd (``dup(2)``: the same open
file, so the same ``struct pid``), taken before SIGTERM is sent and closed as soon as that
target has exited or the escalation is done. The engine may close its own pidfd meanwhile (the
offender exited, was released, or its policy was removed): the escalation's stays open, and a
pid is never looked up by number again.

Shutdown (:meth:`Timers.close`): an escalation whose grace is already over is carried out (its
SIGKILL was decided); one still inside its grace is *cancelled*, logged and audited. Killing it
early would cut short the grace the playbook promised (a process flushing its state on SIGTERM
is exactly what the grace is for, and SIGKILL cannot be taken back); waiting it out would hold
the agent's stop for up to 300 s, past systemd's stop timeout. A cancelled process keeps its
SIGTERM; if it goes on offending, the next agent decides about it again from its records.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from remedy.actions.process import ProcessHandle
from remedy.clock import Clock
from remedy.engine.decisions import ACTED, INTENT, SKIPPED, AuditUnavailable, Decision
from remedy.engine.offender import Handle, Subject
from remedy.errors import ActionError, ProcessGone
from remedy.policy import Policy, Step

__all__ = ["Escalation", "Held", "Timers", "hold"]

log = logging.getLogger(__name__)

Announce = Callable[[Decision], None]
"""Stores an intent durably or raises :class:`AuditUnavailable` (the engine's write-ahead sink)."""


@runtime_checkable
class _Duplicable(Protocol):
    """A pin that can give a second, independently closed pin of the same process."""

    def dup(self) -> Handle: ...


@dataclass(frozen=True)
class Held:
    """A target pinned for the grace period: its pid (for words only) and the owned pin."""

    pid: int
    handle: Handle


def hold(pid: int, handle: Handle) -> Held:
    """A pin of the process ``handle`` pins, owned by the caller (closed by it, independently
    of ``handle``). Raises :class:`ActionError` when none can be had (EMFILE): then nothing
    should be signalled, since the SIGKILL could not follow."""
    try:
        if isinstance(handle, ProcessHandle):
            # dup(2) of a pidfd is the same open file: the same struct pid, never a new lookup.
            return Held(pid, ProcessHandle(os.dup(handle.fileno()), handle.info))
        if isinstance(handle, _Duplicable):
            return Held(pid, handle.dup())
    except OSError as err:
        raise ActionError(f"cannot hold its pidfd for the grace: {err.strerror}", pid=pid) from err
    raise ActionError("cannot hold this pin through the grace period", pid=pid)


def close_all(held: Sequence[Held]) -> None:
    """Close every owned pin (idempotent)."""
    for target in held:
        target.handle.close()


@dataclass(frozen=True)
class Settled:
    """How an escalation ended: how many targets got SIGKILL and how many exited in time."""

    killed: int
    exited: int


class Escalation:
    """SIGKILL, at ``due`` (monotonic seconds), to the targets that have not exited by then.

    :meth:`poll` never blocks. Every owned pin is closed once its process has exited or the
    escalation has settled, so a done escalation holds no descriptor.
    """

    def __init__(self, held: Sequence[Held], *, due: float, grace_s: float) -> None:
        self._alive = list(held)
        self._exited = 0
        self.due = due
        self.grace_s = grace_s
        self.count = len(held)

    @property
    def open_pins(self) -> int:
        """How many pins it still holds (targets that had not exited when last polled)."""
        return len(self._alive)

    def poll(self, now: float) -> Settled | None:
        """Close the pins of targets that exited; past ``due``, SIGKILL the rest. None while
        some target is still inside its grace."""
        self._reap()
        if self._alive and now < self.due:
            return None
        return self.kill()

    def survivors(self) -> int:
        """Close the pins of targets that exited; how many are still running."""
        self._reap()
        return len(self._alive)

    def kill(self) -> Settled:
        """SIGKILL every target still alive, through its own pidfd; close every pin."""
        killed = 0
        try:
            for target in self._alive:
                try:
                    target.handle.send_signal(signal.SIGKILL)
                    killed += 1
                except ProcessGone:
                    self._exited += 1  # exited (and was reaped) since the last poll
        finally:
            close_all(self._alive)
            self._alive = []
        return Settled(killed, self._exited)

    def cancel(self) -> Settled:
        """Give up: no SIGKILL; every pin is closed."""
        self._reap()
        close_all(self._alive)
        left = len(self._alive)
        self._alive = []
        return Settled(0, self.count - left)

    def _reap(self) -> None:
        alive = []
        for target in self._alive:
            if target.handle.has_exited():
                target.handle.close()
                self._exited += 1
            else:
                alive.append(target)
        self._alive = alive


@dataclass(frozen=True)
class _Pending:
    """An escalation with what its audit line names: the policy, the offender, the step."""

    escalation: Escalation
    policy: Policy
    subject: Subject
    step: Step
    started: float
    announced: list[bool] = field(default_factory=lambda: [False])  # its SIGKILL's intent


class Timers:
    """The pending escalations of one executor, polled on the worker's tick."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._pending: list[_Pending] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, escalation: Escalation, policy: Policy, subject: Subject, step: Step) -> None:
        """Track ``escalation`` until it settles (its pins are owned from here on)."""
        self._pending.append(_Pending(escalation, policy, subject, step, self._clock.monotonic()))

    def tick(self, announce: Announce | None = None) -> list[Decision]:
        """Poll every pending escalation; the audit lines of those that settled. With
        ``announce``, a SIGKILL is sent only once its intent is stored: one the audit cannot
        take stays pending (SIGTERM sent, no SIGKILL) and is tried again on the next tick."""
        if not self._pending:
            return []
        now = self._clock.monotonic()
        decisions, still = [], []
        for pending in self._pending:
            if not self._announce(pending, now, announce):
                still.append(pending)
                continue
            decision = self._poll(pending, now)
            if decision is None:
                still.append(pending)
            else:
                decisions.append(decision)
        self._pending = still
        return decisions

    def close(self, announce: Announce | None = None) -> list[Decision]:
        """The agent stops: carry out escalations already due (once their SIGKILL's intent is
        stored), cancel the others (see the module's docstring for why); the audit line of
        each."""
        now = self._clock.monotonic()
        decisions = []
        pending, self._pending = self._pending, []
        for item in pending:
            escalation = item.escalation
            if now >= escalation.due and self._announce(item, now, announce):
                decision = self._poll(item, now)  # due: it settles now
                if decision is not None:
                    decisions.append(decision)
                continue
            settled = escalation.cancel()
            left = escalation.due - now
            reason = (
                f"agent stopping: SIGKILL cancelled with {left:.1f} s of its "
                f"{escalation.grace_s:g} s grace left"
                if left > 0
                else "agent stopping: SIGKILL cancelled, its intent could not be audited"
            )
            alive = escalation.count - settled.exited
            detail = f"{alive} process(es) still running after SIGTERM, {settled.exited} exited"
            log.warning("terminate of pid %d: %s; %s", item.subject.pid, reason, detail)
            decisions.append(self._decision(item, SKIPPED, reason, detail))
        return decisions

    def _announce(self, pending: _Pending, now: float, announce: Announce | None) -> bool:
        """Whether ``pending`` may be polled: not due, nothing left to kill, no write-ahead
        sink, or its SIGKILL's intent is stored (once)."""
        escalation = pending.escalation
        if announce is None or pending.announced[0] or now < escalation.due:
            return True
        alive = escalation.survivors()
        if not alive:
            return True
        intent = self._decision(
            pending,
            INTENT,
            f"grace of {escalation.grace_s:g} s over: about to SIGKILL",
            f"{alive} process(es) still running after SIGTERM",
        )
        try:
            announce(intent)
        except AuditUnavailable as err:
            log.error("terminate of pid %d: SIGKILL held: %s", pending.subject.pid, err)
            return False
        pending.announced[0] = True
        return True

    def _poll(self, pending: _Pending, now: float) -> Decision | None:
        try:
            settled = pending.escalation.poll(now)
        except ActionError as err:
            # Signalling failed (EPERM): its pins are closed, it is over; say so.
            pending.escalation.cancel()
            log.warning("terminate of pid %d: SIGKILL failed: %s", pending.subject.pid, err)
            return self._decision(pending, err.outcome, str(err), "no SIGKILL")
        return None if settled is None else self._settled(pending, settled, now)

    def _settled(self, pending: _Pending, settled: Settled, now: float) -> Decision:
        grace = pending.escalation.grace_s
        if settled.killed:
            reason = f"grace of {grace:g} s over: still running after SIGTERM"
            detail = (
                f"SIGKILL to {settled.killed} process(es) through their pidfds, "
                f"{settled.exited} exited in time"
            )
            log.warning("terminate of pid %d: %s; %s", pending.subject.pid, reason, detail)
            return self._decision(pending, ACTED, reason, detail)
        took = now - pending.started
        reason = f"exited within the {grace:g} s grace: no SIGKILL"
        detail = f"{settled.exited} process(es) exited after SIGTERM (seen within {took:.1f} s)"
        log.info("terminate of pid %d: %s", pending.subject.pid, reason)
        return self._decision(pending, SKIPPED, reason, detail)

    def _decision(self, pending: _Pending, outcome: str, reason: str, detail: str) -> Decision:
        """The audit line of an escalation. It follows the ``acted`` line of its terminate
        (same policy, pid, start time and action) and has no record of its own: count 0, and
        step -1 (the executor is not told the step's index; the acted line has it)."""
        policy, subject = pending.policy, pending.subject
        if subject.is_cgroup:
            target = f"cgroup {subject.cgroup_display} (inode {subject.cgroup_inode})"
        else:
            target = f"pid {subject.pid} ({subject.comm}) in {subject.cgroup_display}"
        text = f"{pending.step.action} {target}: {reason}; {detail}"
        return Decision(
            time=self._clock.wall(),
            policy=policy.name,
            signal=policy.signal,
            pid=subject.pid,
            start_ticks=subject.start_ticks,
            comm=subject.comm,
            ppid=subject.ppid,
            exe=subject.exe,
            cgroup=subject.cgroup_display,
            count=0,
            window_s=policy.window_s,
            action=pending.step.action,
            step=-1,
            dry_run=False,
            outcome=outcome,
            reason=reason,
            message=text,
            state="remediating",
        )
