"""Identify the process behind a kernel record, once, and pin it with a pidfd."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.process import ProcessHandle
from remedy.engine.offender import Subject
from remedy.errors import ActionError
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS
from remedy.sensors.context import Enricher
from remedy.sensors.records import SensorRecord

MAX_PARENTS = 4


def offender_pid(record: SensorRecord) -> int:
    """Who the record is about: the parent for parent-keyed signals (a crash loop's supervisor,
    a churning spawner), else the process whose event crossed. Cgroup-keyed signals name the
    crossing process until offender scopes (process tree, cgroup) exist."""
    if SIGNALS[record.signal].key == "parent" and record.key > 0:
        return record.key
    return record.tgid


class ProcIdentifier:
    """Reads /proc and the cgroup of a recorded tgid.

    The pidfd is bound with ``started_before_ns`` set to the crossing time: a process that
    started after the kernel counted the forks holds a reused pid and is not the offender.
    """

    def __init__(
        self,
        procfs: ProcFS,
        cgroups: CgroupDriver,
        enricher: Enricher | None = None,
        stack_of: Callable[[SensorRecord], tuple[str, ...]] | None = None,
    ) -> None:
        self._procfs = procfs
        self._cgroups = cgroups
        self._enricher = enricher
        self._stack_of = stack_of

    def identify(self, record: SensorRecord) -> Subject:
        handle = ProcessHandle.bind(
            offender_pid(record), self._procfs, started_before_ns=record.ts_boot_ns
        )
        try:
            info = handle.info
            cgroup = self._cgroups.cgroup_of(info.pid)
        except ActionError:
            handle.close()
            raise
        context = None
        if self._enricher is not None:
            # About the offender, which for parent-keyed signals is not the record's task.
            context = self._enricher.enrich(replace(record, tgid=info.pid, ppid=info.ppid), info)
        # The chain the enricher built (with the kernel's lineage for exited parents).
        parents = tuple((a.pid, a.comm) for a in context.parents[:MAX_PARENTS]) if context else ()
        return Subject(
            pid=info.pid,
            start_ticks=info.start_ticks,
            comm=info.comm,
            ppid=info.ppid,
            exe=info.exe,
            uid=info.uid,
            is_kernel_thread=info.is_kernel_thread,
            cgroup=cgroup,
            cgroup_display=self._cgroups.display_path(cgroup),
            handle=handle,
            parents=parents,
            context=context,
            stack=self._stack_of(record) if self._stack_of else (),
        )
