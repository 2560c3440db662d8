"""Quarantine: move the offender into a cgroup of its own, capped in tasks and CPU."""

from __future__ import annotations

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import Limits
from remedy.actions.params import ActionParams, QuarantineParams
from remedy.engine.offender import Subject
from remedy.errors import ProcessGone


class Quarantine:
    """Caps a fork storm without killing anything: pids.max makes further forks fail (EAGAIN)
    and the CPU cap slows the loop that retries them."""

    name = "quarantine"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, QuarantineParams)
        target = ctx.cgroups.display_path(ctx.quarantine_of(subject))
        return f"into {target} (pids.max {params.pids_max}, cpu {params.cpu:g})"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, QuarantineParams)
        rel = ctx.quarantine_of(subject)
        # Moving is by pid, so check the pinned process first: while it has not exited (been
        # reaped) its pid cannot be reused, so the move below reaches the right process.
        if subject.handle is not None and subject.handle.has_exited():
            raise ProcessGone("exited before quarantine", pid=subject.pid, cgroup=rel)
        ctx.cgroups.create(rel, Limits(pids_max=params.pids_max, cpu_cores=params.cpu))
        ctx.cgroups.move(subject.pid, rel)
        return f"{len(ctx.cgroups.members(rel))} task(s) in quarantine"
