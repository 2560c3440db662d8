"""Identify the process behind a kernel record, once, and pin it with a pidfd."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.process import Birth, BirthRegistry, ProcessHandle
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


def offender_birth(record: SensorRecord) -> Birth | None:
    """The birth of :func:`offender_pid`'s process as the kernel knew it when counting (the
    parent's own for parent-keyed signals). None for records that carry none (the /proc
    sampler, old traces): those fall back to "started before the record"."""
    if record.sampled:
        return None
    kind = SIGNALS[record.signal].key
    return Birth(record.birth_ns if kind == "cgroup" else record.key_birth_ns)


class ProcIdentifier:
    """Reads /proc and the cgroup of a recorded tgid.

    The pidfd is bound to the process born when the record says (its birth, checked at full
    resolution against the kernel's births map, ``births``): a process that took the pid after
    the kernel counted is never the offender. Records without a birth (the sampler) are bound
    with ``started_before_ns`` set to the crossing time instead.
    """

    def __init__(
        self,
        procfs: ProcFS,
        cgroups: CgroupDriver,
        enricher: Enricher | None = None,
        stack_of: Callable[[SensorRecord], tuple[str, ...]] | None = None,
        births: BirthRegistry | None = None,
    ) -> None:
        self._procfs = procfs
        self._cgroups = cgroups
        self._enricher = enricher
        self._stack_of = stack_of
        self._births = births

    def identify(self, record: SensorRecord) -> Subject:
        birth = offender_birth(record)
        handle = ProcessHandle.bind(
            offender_pid(record),
            self._procfs,
            started_before_ns=record.ts_boot_ns,
            birth=birth,
            registry=self._births,
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
            birth_ns=birth.ns if birth is not None else 0,
        )
