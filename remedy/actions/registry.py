"""Actions by the name playbooks use, and the executor the engine calls."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace
from typing import TYPE_CHECKING

from remedy.actions.base import Action, ActionContext
from remedy.actions.kill import Kill
from remedy.actions.quarantine import Quarantine
from remedy.actions.signals import Continue, Ionice, Notify, Renice, Stop, Terminate
from remedy.actions.throttle import Freeze, IoWeight, LimitMemory, LimitPids, Thaw, ThrottleCpu
from remedy.actions.timers import Announce, Timers
from remedy.clock import Clock, SystemClock
from remedy.engine.decisions import Decision
from remedy.engine.offender import Subject

if TYPE_CHECKING:
    from remedy.actions.undoer import Undoer
    from remedy.sensors.fastpath import FastPath
from remedy.errors import ActionError
from remedy.policy import Policy, Step

log = logging.getLogger(__name__)

ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Quarantine(),
        Kill(),
        ThrottleCpu(),
        LimitMemory(),
        LimitPids(),
        Freeze(),
        Thaw(),
        IoWeight(),
        Notify(),
        Renice(),
        Ionice(),
        Stop(),
        Continue(),
        Terminate(),
    )
}


def _signal_of(step: Step) -> signal.Signals:
    if step.action == "stop":
        return signal.SIGSTOP
    return signal.Signals[getattr(step.params, "signal", "SIGKILL")]


class ActionExecutor:
    """Looks up each step's action and runs it with the injected context. A terminate's grace
    period is a timer (:class:`Timers`) the engine advances with :meth:`tick` and settles with
    :meth:`close`: the worker never sleeps it out."""

    def __init__(
        self,
        ctx: ActionContext,
        undoer: Undoer | None = None,
        fastpath: FastPath | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.ctx = ctx
        self.undoer = undoer  # journals reversible steps before they are applied
        self.fastpath = fastpath  # the in-kernel fork fast path, when the sched section runs
        # Monotonic: grace periods are real seconds of the processes signalled.
        self._clock = clock or SystemClock()
        self.timers = Timers(self._clock)

    def describe(self, step: Step, subject: Subject) -> str:
        if step.kernel:
            return f"arm the in-kernel fast path: {_signal_of(step).name} at its next fork"
        return ACTIONS[step.action].describe(step.params, subject, self._ctx(step))

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        if step.kernel:
            return self._arm(step, subject, policy)
        action, ctx = ACTIONS[step.action], self._ctx(step)
        try:
            if isinstance(action, Terminate):
                detail, escalation = action.start(
                    step.params, subject, ctx, self._clock.monotonic()
                )
                if escalation.count:  # none left to wait for: nothing is held
                    self.timers.add(escalation, policy, subject, step)
                return detail
            if self.undoer is None:
                return action.run(step.params, subject, ctx)
            return self.undoer.apply(
                action, step.params, subject, ctx, policy=policy.name, ttl_s=step.ttl_s
            )
        except ActionError as err:
            if err.policy is None:
                err.policy = policy.name
            raise

    def tick(self, announce: Announce | None = None) -> list[Decision]:
        """Advance the timers (on the worker thread, from the engine's tick): the audit lines
        of escalations that settled (SIGKILL sent, or every target exited in time). With
        ``announce``, each SIGKILL is written ahead first (see :meth:`Timers.tick`)."""
        return self.timers.tick(announce)

    def close(self, announce: Announce | None = None) -> list[Decision]:
        """The agent stops: settle every pending escalation (see remedy/actions/timers.py)."""
        return self.timers.close(announce)

    def _arm(self, step: Step, subject: Subject, policy: Policy) -> str:
        """A fork bomb forks again within microseconds: the kernel signals it right there,
        with no round trip through user space. Protected processes are refused in the kernel
        as well as by the engine."""
        if self.fastpath is None:
            raise ActionError(
                "in-kernel fast path not available (no kernel sched section)",
                pid=subject.pid,
                policy=policy.name,
            )
        sig = _signal_of(step)
        try:
            self.fastpath.arm(subject.pid, subject.birth_ns, int(sig), dry_run=False)
        except ActionError as err:
            err.policy = policy.name
            raise
        return f"armed: the kernel sends {sig.name} at its next fork"

    def _ctx(self, step: Step) -> ActionContext:
        return self.ctx if step.scope == self.ctx.scope else replace(self.ctx, scope=step.scope)

    def release(self, subject: Subject) -> None:
        """Disarm the offender's fast path; remove its quarantine once nothing lives in it (the
        undo journal moves live members back when the change is reverted)."""
        if self.fastpath is not None and self.fastpath.disarm(subject.pid, subject.birth_ns):
            log.info("disarmed the fast path of pid %d", subject.pid)
        rel = self.ctx.quarantine_of(subject)
        if self.ctx.cgroups.exists(rel) and not self.ctx.cgroups.members(rel):
            self.ctx.cgroups.remove(rel)
            log.info("removed empty quarantine %s", rel)
