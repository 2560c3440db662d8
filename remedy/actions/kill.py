"""Kill: signal the offender through its pidfd, then whatever it left in its quarantine."""

from __future__ import annotations

import signal
import time

from remedy.actions.base import ActionContext
from remedy.actions.params import ActionParams, KillParams
from remedy.actions.process import ProcessHandle
from remedy.engine.offender import Subject
from remedy.errors import ActionError, ProcessGone


class Kill:
    """Signals never go to a bare pid: the offender through the pidfd opened when it was
    identified, quarantine members through pidfds bound just now and checked against their start
    time (a member started after we looked is not ours to kill)."""

    name = "kill"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, KillParams)
        extra = ", and every member of its quarantine" if params.quarantine else ""
        return f"{params.signal} through its pidfd{extra}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, KillParams)
        sig = signal.Signals[params.signal]
        if subject.handle is None:
            raise ActionError(
                "no pidfd for the offender; refusing to signal a bare pid", pid=subject.pid
            )
        subject.handle.send_signal(sig)
        swept = self._sweep(sig, subject, ctx) if params.quarantine else 0
        return f"signalled the offender and {swept} quarantine member(s)"

    def _sweep(self, sig: int, subject: Subject, ctx: ActionContext) -> int:
        rel = ctx.quarantine_of(subject)
        if not ctx.cgroups.exists(rel):
            return 0
        now_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        swept = 0
        # Members can keep forking between our read and our signal; a few passes catch them.
        for _ in range(5):
            members = [p for p in ctx.cgroups.members(rel) if p != subject.pid]
            if not members:
                break
            for pid in members:
                try:
                    with ProcessHandle.bind(pid, ctx.procfs, started_before_ns=now_ns) as member:
                        member.send_signal(sig)
                        swept += 1
                except ProcessGone:
                    continue
        return swept
