"""Identify the process behind a kernel record, once, and pin it with a pidfd."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.process import Birth, BirthRegistry, ProcessHandle
from remedy.engine.offender import Member, Subject
from remedy.errors import ActionError, CgroupError, IdentityUnverified
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS
from remedy.sensors.context import CgroupIndex, Enricher, key_hierarchy, parse_container
from remedy.sensors.records import SensorRecord
from remedy.sensors.sampler import cgroup_key

MAX_PARENTS = 4


class RootCgroup(CgroupError):
    """A cgroup signal's key named its hierarchy's root: every process not placed anywhere,
    never an offender (the kernel does not count it; this is the user-space guard)."""

    outcome = "root-cgroup"


class CgroupPin:
    """The handle of a cgroup offender: pins the cgroup by the inode it was identified with, so
    the engine sees it "exit" when the cgroup is removed or replaced under the same name.

    It signals nothing: a cgroup is no process. Every step on a cgroup offender acts with scope
    cgroup (the engine sees to it), and those actions reach the members, each through a pidfd of
    its own bound when they act; ``send_signal`` on the cgroup itself is that no-op.
    """

    def __init__(self, cgroups: CgroupDriver, rel: str, inode: int) -> None:
        self._cgroups = cgroups
        self.rel = rel
        self.inode = inode

    def has_exited(self) -> bool:
        try:
            return self._cgroups.inode(self.rel) != self.inode
        except CgroupError:
            return True  # removed

    def send_signal(self, sig: int) -> None:
        """Nothing: the members are signalled by the action's reach (see the class)."""

    def close(self) -> None:
        """Nothing to release: no descriptor is held."""


def offender_pid(record: SensorRecord) -> int:
    """Who the record is about: the parent for parent-keyed signals (a crash loop's supervisor,
    a churning spawner), else the process whose event crossed. (Cgroup-keyed records are about
    a cgroup, not a process: see :meth:`ProcIdentifier.identify`.)"""
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
        *,
        key_index: CgroupIndex | None = None,
    ) -> None:
        """``key_index``: the index of the hierarchy cgroup signals are keyed by (default: the
        one :func:`key_hierarchy` names for the driver's root)."""
        self._procfs = procfs
        self._cgroups = cgroups
        self._enricher = enricher
        self._stack_of = stack_of
        self._births = births
        self._key_index = key_index

    def identify(self, record: SensorRecord) -> Subject:
        if SIGNALS[record.signal].key == "cgroup":
            return self._cgroup_subject(record)
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
            # Name the cgroup in the hierarchy acted on: on a hybrid host the record's cgroup2
            # id is "/" for nearly every process, which names nothing.
            container = parse_container(cgroup) or context.container
            context = replace(context, cgroup_path=cgroup, container=container)
        # The chain the enricher built (with the kernel's lineage for exited parents).
        parents = tuple((a.pid, a.comm) for a in context.parents[:MAX_PARENTS]) if context else ()
        subject = Subject.pinned(
            info,
            handle,
            cgroup,
            display,
            cgroup_inode=cgroup_inode,
            birth_ns=birth.ns if birth is not None else 0,
        )
        subject.parents = parents
        subject.context = context
        subject.stack = self._stack_of(record) if self._stack_of else ()
        # Symbolizing runs native code that has closed descriptors it did not own (libbcc
        # < 0.33, bcc #5193): the pin must still be the pidfd opened above, or the record is
        # dropped (IdentityUnverified) rather than acted on through whatever took its number.
        handle.verify()
        return subject

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

    # -- cgroup-keyed records: the offender is the cgroup ------------------------------------

    def _cgroup_subject(self, record: SensorRecord) -> Subject:
        """The cgroup a cgroup-keyed record counted, named by path and pinned by inode. The
        crossing process may be long gone (a fanout's children, a crash loop's execs): it is
        context only, never identified or acted on."""
        rel, inode = self._sampled_cgroup(record) if record.sampled else self._keyed_cgroup(record)
        if rel == "/":
            raise RootCgroup(
                f"{record.signal}: the hierarchy root is never an offender", cgroup=rel
            )
        context = None
        if self._enricher is not None:
            about = self._enricher.enrich(record)
            container = parse_container(rel) or about.container
            context = replace(about, cgroup_path=rel, container=container)
        return Subject(
            pid=0,
            start_ticks=inode,
            comm="",
            ppid=0,
            exe=None,
            uid=-1,
            is_kernel_thread=False,
            cgroup=rel,
            cgroup_display=self._cgroups.display_path(rel),
            handle=CgroupPin(self._cgroups, rel, inode),
            context=context,
            stack=self._stack_of(record) if self._stack_of else (),
            cgroup_inode=inode,
            members=self._subtree_members(rel),
        )

    def _index(self) -> CgroupIndex:
        if self._key_index is None:
            self._key_index = CgroupIndex.for_keys(self._cgroups.root)
        return self._key_index

    def _keyed_cgroup(self, record: SensorRecord) -> tuple[str, int]:
        """The kernel's key is the inode of the cgroup's directory in the hierarchy the keys come
        from, which must be the one the driver acts on: inodes of different hierarchies
        collide (each numbers its own), so an id is only resolved in its own."""
        keys = key_hierarchy(self._cgroups.root)
        if (keys == "cgroup2") != (self._cgroups.version == 2):
            raise IdentityUnverified(
                f"{record.signal}: keys come from {keys}, but cgroups are acted on through "
                f"v{self._cgroups.version}; refusing to resolve them across hierarchies"
            )
        index = self._index()
        rel = index.path_of(record.key)
        if rel is None:
            raise IdentityUnverified(
                f"{record.signal}: no cgroup with inode {record.key} in {index.mount} "
                "(removed since?)"
            )
        if rel != "/":
            self._check_inode(record, rel, record.key)
        return rel, record.key

    def _sampled_cgroup(self, record: SensorRecord) -> tuple[str, int]:
        """The sampler keys a cgroup by a hash of its path: the crossing process's cgroup
        (where it still is) must hash to the key; anything else is refused, never guessed."""
        try:
            rel = self._cgroups.cgroup_of(record.tgid)
        except CgroupError as err:
            raise IdentityUnverified(
                f"{record.signal}: cannot read the crossing process's cgroup: {err}",
                pid=record.tgid,
            ) from err
        if cgroup_key(rel) != record.key:
            raise IdentityUnverified(
                f"{record.signal}: the crossing process is no longer in the cgroup counted",
                pid=record.tgid,
                cgroup=rel,
            )
        return rel, self._cgroups.inode(rel) if rel != "/" else 0

    def _check_inode(self, record: SensorRecord, rel: str, inode: int) -> None:
        if self._cgroups.inode(rel) != inode:
            raise IdentityUnverified(
                f"{record.signal}: {rel} is another cgroup now (inode changed since it counted)",
                cgroup=rel,
            )

    def _subtree_members(self, rel: str) -> tuple[Member, ...]:
        """Every process in ``rel`` and below, with what protection judges it by."""
        top = Path(self._cgroups.display_path(rel))
        pids: set[int] = set()
        for dirpath, _dirs, _files in os.walk(top):
            sub = Path(dirpath).relative_to(top).as_posix()
            try:
                pids.update(self._cgroups.members(rel if sub == "." else f"{rel}/{sub}"))
            except CgroupError:
                continue  # removed while we walked
        return tuple(self._member(pid) for pid in sorted(pids))

    def _member(self, pid: int) -> Member:
        try:
            info = self._procfs.read(pid)
        except ActionError:
            return Member(pid)  # gone (or unreadable): still judged by its pid
        return Member(pid, info.exe, info.is_kernel_thread, info.start_ticks, info.uid)
