"""Kill: signal the offender through its pidfd, then whatever it left in its quarantine."""

from __future__ import annotations

import signal
import time

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import Limits
from remedy.actions.params import ActionParams, KillParams
from remedy.actions.process import ProcessHandle, signal_pinned
from remedy.engine.offender import Subject
from remedy.errors import ActionError, CgroupError


class Kill:
    """Signals never go to a bare pid: the offender through the pidfd opened when it was
    identified; its tree, cgroup or quarantine members through pidfds bound first and judged
    (protected? still in scope?) through the pinned process afterwards."""

    name = "kill"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, KillParams)
        extra = ", and every member of its quarantine" if params.quarantine else ""
        reach = {"tree": " and its descendants", "cgroup": " and every process of its cgroup"}
        return f"{params.signal} through its pidfd{reach.get(ctx.scope, '')}{extra}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, KillParams)
        sig = signal.Signals[params.signal]
        if subject.handle is None:
            raise ActionError(
                "no pidfd for the offender; refusing to signal a bare pid", pid=subject.pid
            )
        # Find (and pin) the tree before the offender dies: its orphans are reparented at once.
        now_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        with ctx.pinned_reach(subject, now_ns) as targets:
            if ctx.scope == "cgroup" and sig == signal.SIGKILL:
                whole = self._kill_cgroup(subject, targets, ctx)
                if whole:
                    return whole
            subject.handle.send_signal(sig)
            reached = signal_pinned(targets, sig)
        swept = self._sweep(sig, subject, ctx) if params.quarantine else 0
        return (
            f"signalled the offender, {reached} process(es) of its {ctx.scope} scope "
            f"and {swept} quarantine member(s)"
        )

    def _kill_cgroup(
        self, subject: Subject, targets: list[ProcessHandle], ctx: ActionContext
    ) -> str:
        """Scope cgroup, SIGKILL: all at once, so nothing forks its way out between reading the
        members and signalling them. Only when no member is spared (reach() left none out):
        otherwise each member is signalled through its own pidfd instead."""
        members = ctx.cgroups.members(subject.cgroup)
        if set(members) - {subject.pid} != {h.pid for h in targets}:
            return ""  # a protected process lives here: never kill the cgroup wholesale
        if ctx.cgroups.kill_all(subject.cgroup):
            return f"cgroup.kill on {subject.cgroup_display}: {len(members)} process(es)"
        # cgroup v1: freeze, signal each member, thaw (the kills land as the tasks thaw).
        try:
            ctx.cgroups.apply(subject.cgroup, Limits(frozen=True))
        except CgroupError:
            return ""  # no freezer cgroup at this path: signal one by one
        try:
            assert subject.handle is not None
            subject.handle.send_signal(signal.SIGKILL)
            done = signal_pinned(targets, signal.SIGKILL)
        finally:
            ctx.cgroups.apply(subject.cgroup, Limits(frozen=False))
        return f"froze {subject.cgroup_display}, SIGKILL to {done + 1} process(es), thawed"

    def _sweep(self, sig: int, subject: Subject, ctx: ActionContext) -> int:
        rel = ctx.quarantine_of(subject)
        if not ctx.cgroups.exists(rel):
            return 0
        swept = 0
        # Members can keep forking between our read and our signal; a few passes catch them.
        for _ in range(5):
            with ctx.pinned_members(rel) as members:
                others = [h for h in members if h.pid != subject.pid]
                if not others:
                    break
                swept += signal_pinned(others, sig)
        return swept
