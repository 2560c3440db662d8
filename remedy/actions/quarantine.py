"""Quarantine: move the offender into a cgroup of its own, capped in tasks and CPU."""

from __future__ import annotations

import time

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import Limits
from remedy.actions.params import ActionParams, QuarantineParams
from remedy.actions.throttle import (
    INODE_KEY,
    current_limits,
    into_quarantine,
    kept_words,
    new_record,
    record_origins,
    revert_quarantine,
)
from remedy.actions.undo import UndoRecord
from remedy.engine.offender import Subject
from remedy.errors import ProcessGone


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
        # Every cap it was under comes along (memory, freeze, a tighter pids.max or quota):
        # a quarantine must never be a way out of a limit.
        applied = into_quarantine(subject, rel, limits, ctx)
        n = len(ctx.cgroups.members(rel))
        return f"{n} task(s) in quarantine{kept_words(limits, applied)}"

    def undo(
        self,
        params: ActionParams,
        subject: Subject,
        ctx: ActionContext,
        *,
        policy: str,
        ttl_s: float,
        now_wall: float,
    ) -> UndoRecord:
        """A quarantine is a throttle too: it is taken back (members moved home) like one."""
        if ctx.scope == "cgroup":
            rel = ctx.gate_cgroup(subject, "quarantine in place")
            knobs = ctx.cgroups.read_knobs(rel, ("pids_max", "cpu_cores"))
            # Revert restores this very cgroup, not whatever later takes its name.
            knobs[INODE_KEY] = str(ctx.cgroups.inode(rel))
            return new_record(
                self.name,
                subject,
                subject.cgroup,
                policy=policy,
                ttl_s=ttl_s,
                now_wall=now_wall,
                previous=knobs,
            )
        rel = ctx.quarantine_of(subject)
        if ctx.cgroups.exists(rel):  # only the step that creates the quarantine owns the move
            return new_record(
                self.name, subject, rel, policy=policy, ttl_s=ttl_s, now_wall=now_wall
            )
        pids = (subject.pid, *ctx.reach_pids(subject, time.clock_gettime_ns(time.CLOCK_BOOTTIME)))
        return new_record(
            self.name,
            subject,
            rel,
            policy=policy,
            ttl_s=ttl_s,
            now_wall=now_wall,
            original_cgroup=subject.cgroup,
            pids=pids,
            origins=record_origins(subject, pids, ctx),
        )

    def revert(self, record: UndoRecord, ctx: ActionContext) -> str:
        if record.original_cgroup is not None:
            return revert_quarantine(record.cgroup, record, ctx)
        if not ctx.cgroups.exists(record.cgroup):
            return f"{record.cgroup} is gone: nothing to restore"
        previous = dict(record.previous)
        inode = previous.pop(INODE_KEY, None)
        if inode is not None and ctx.cgroups.inode(record.cgroup) != int(inode):
            return f"{record.cgroup} was replaced since: nothing of ours to restore"
        if previous:
            ctx.cgroups.write_knobs(record.cgroup, previous)
        return f"restored {ctx.cgroups.display_path(record.cgroup)}"

    @staticmethod
    def _cap_in_place(subject: Subject, ctx: ActionContext, limits: Limits) -> str:
        """Scope cgroup: the offender is the whole cgroup; cap it where it is (never creating
        it again: a removed cgroup is gone, not ours to make)."""
        rel = ctx.gate_cgroup(subject, "quarantine in place")
        # Its own caps may be tighter already (ancestors' apply anyway, hierarchically).
        held = current_limits(rel, limits.knobs(), ctx)  # pids_max, cpu_cores
        applied = limits.tightened(held)
        ctx.cgroups.apply(rel, applied)
        n = len(ctx.cgroups.members(rel))
        return f"{n} task(s) capped{kept_words(limits, applied)}"
