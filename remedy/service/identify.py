"""Identify the process behind a kernel record, once, and pin it with a pidfd."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.process import Birth, BirthRegistry, ProcessHandle
from remedy.engine.offender import Subject
from remedy.errors import CgroupError, IdentityUnverified
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
            return self._subject(record, handle, birth)
        except BaseException:
            # Whatever fails once the process is pinned, the pidfd goes with it: one leaked
            # per record would soon exhaust the agent's descriptors.
            handle.close()
            raise

    def _subject(self, record: SensorRecord, handle: ProcessHandle, birth: Birth | None) -> Subject:
        info = handle.info
        cgroup = self._cgroup_of(record, info.pid)
        display = self._cgroups.display_path(cgroup)
        self._check_cgroup_id(record, info.pid, cgroup)
        try:
            cgroup_inode = self._cgroups.inode(cgroup)
        except CgroupError:
            cgroup_inode = 0  # cgroup-scope actions refuse an unknown inode
        context = None
        if self._enricher is not None:
            # About the offender, which for parent-keyed signals is not the record's task: then
            # the record's cgroup id is the child's, so the parent's cgroup comes from /proc.
            about = replace(record, tgid=info.pid, ppid=info.ppid)
            if info.pid != record.tgid:
                about = replace(about, cgroup_id=0)
            context = self._enricher.enrich(about, info)
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
            cgroup_display=display,
            handle=handle,
            parents=parents,
            context=context,
            stack=self._stack_of(record) if self._stack_of else (),
            birth_ns=birth.ns if birth is not None else 0,
            cgroup_inode=cgroup_inode,
        )

    def _check_cgroup_id(self, record: SensorRecord, pid: int, cgroup: str) -> None:
        """The record's cgroup id is the inode of the task's cgroup2 directory when the kernel
        counted; the path /proc gives must resolve to that very directory, or what remedy would
        act on is not what was counted (a forged or racing path): refused. Skipped where the
        record names another task (parent-keyed) or carries no id (the sampler)."""
        if record.cgroup_id <= 0 or pid != record.tgid:
            return
        if self._cgroups.version == 2:
            inode = self._cgroups.inode(cgroup)
        else:
            index = self._enricher.cgroup_index if self._enricher is not None else None
            if index is None:
                return  # no cgroup2 mount to check against
            inode = self._procfs.cgroup2_inode(pid, index.mount)
        if inode != record.cgroup_id:
            raise IdentityUnverified(
                f"its cgroup2 directory (inode {inode}) is not the one the kernel counted "
                f"in (id {record.cgroup_id})",
                pid=pid,
                cgroup=cgroup,
            )

    def _cgroup_of(self, record: SensorRecord, pid: int) -> str:
        """The offender's cgroup as the driver acts on it. When /proc cannot say (a reader in a
        private cgroup namespace sees "/.."), the host's view: the record's cgroup id is the
        inode of its cgroup2 directory, which the cgroup index maps to a path under the mount,
        trusted only once that cgroup.procs lists the pid."""
        try:
            return self._cgroups.cgroup_of(pid)
        except CgroupError:
            host = self._host_view(record, pid)
            if host is None:
                raise
            return host

    def _host_view(self, record: SensorRecord, pid: int) -> str | None:
        index = self._enricher.cgroup_index if self._enricher is not None else None
        if (
            index is None
            or self._cgroups.version != 2
            or index.mount != self._cgroups.root
            # The id is of the record's task; a parent-keyed offender may live elsewhere.
            or pid != record.tgid
        ):
            return None
        path = index.path_of(record.cgroup_id)
        if path is None:
            return None
        try:
            return path if self._cgroups.contains(path, pid) else None
        except CgroupError:
            return None
