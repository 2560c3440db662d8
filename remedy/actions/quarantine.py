"""Quarantine: move the offender into a cgroup of its own, capped in tasks and CPU."""

from __future__ import annotations

import contextlib
import time

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import Limits
from remedy.actions.params import ActionParams, QuarantineParams
from remedy.engine.offender import Subject
from remedy.errors import CgroupError, ProcessGone


class Quarantine:
    """Caps a fork storm without killing anything: pids.max makes further forks fail (EAGAIN)
    and the CPU cap slows the loop that retries them."""

    name = "quarantine"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, QuarantineParams)
        limits = f"(pids.max {params.pids_max}, cpu {params.cpu:g})"
        if ctx.scope == "cgroup":
            return f"capping its whole cgroup {subject.cgroup_display} in place {limits}"
        target = ctx.cgroups.display_path(ctx.quarantine_of(subject))
        tree = ", with its descendants," if ctx.scope == "tree" else ""
        return f"into {target}{tree} {limits}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, QuarantineParams)
        rel = ctx.quarantine_of(subject)
        # Moving is by pid, so check the pinned process first: while it has not exited (been
        # reaped) its pid cannot be reused, so the move below reaches the right process.
        if subject.handle is not None and subject.handle.has_exited():
            raise ProcessGone("exited before quarantine", pid=subject.pid, cgroup=rel)
        limits = Limits(pids_max=params.pids_max, cpu_cores=params.cpu)
        if ctx.scope == "cgroup":
            return self._cap_in_place(subject, ctx, limits)
        now_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        ctx.cgroups.create(rel, limits)
        ctx.cgroups.move(subject.pid, rel)
        for pid in ctx.reach(subject, now_ns):  # scope tree: its descendants follow it
            with contextlib.suppress(ProcessGone):
                ctx.cgroups.move(pid, rel)
        return f"{len(ctx.cgroups.members(rel))} task(s) in quarantine"

    @staticmethod
    def _cap_in_place(subject: Subject, ctx: ActionContext, limits: Limits) -> str:
        """Scope cgroup: the offender is the whole cgroup; cap it where it is."""
        if subject.cgroup in ("", "/"):
            raise CgroupError("refusing to cap the root cgroup", cgroup=subject.cgroup)
        ctx.cgroups.create(subject.cgroup, limits)
        return f"{len(ctx.cgroups.members(subject.cgroup))} task(s) capped"
