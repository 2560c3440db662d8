"""What every action gets: where cgroups and processes are, and where quarantines go."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.params import ActionParams
from remedy.actions.process import ProcessHandle
from remedy.engine.offender import Handle, Subject
from remedy.errors import ActionError, CgroupError, ProcessGone, ProtectedProcess
from remedy.proc import ProcessInfo, ProcFS


@dataclass(frozen=True)
class ActionContext:
    """Injected roots: tests point these at fixture trees or a test's own cgroup."""

    cgroups: CgroupDriver
    procfs: ProcFS
    quarantine_root: str = "/remedy"
    scope: str = "process"  # the policy's scope, set per step by the executor
    # Why a process an action would reach must be spared (the engine's protector), or None.
    spare: Callable[[ProcessInfo], str | None] = lambda _info: None

    def quarantine_of(self, subject: Subject) -> str:
        """One quarantine per offender identity, so a reused pid never shares one."""
        return f"{self.quarantine_root.rstrip('/')}/q-{subject.pid}-{subject.start_ticks}"

    def reach_pids(self, subject: Subject, started_before_ns: int) -> tuple[int, ...]:
        """The pids :meth:`pinned_reach` finds now, for an undo record's list (no action
        goes through these numbers)."""
        with self.pinned_reach(subject, started_before_ns) as reached:
            return tuple(h.pid for h in reached)

    def gate_cgroup(self, subject: Subject, what: str) -> str:
        """The one reach gate for every action on the offender's whole cgroup (a limit or a
        quarantine in place, a freeze, cgroup.kill, signals to its members): ``subject.cgroup``
        unless it is the root cgroup, a cgroup replaced since identification (its inode
        differs), or one whose *subtree* holds the agent, its ancestors, pid 1 or a protected
        process (a freeze, a limit or cgroup.kill reaches all of them). Raises
        :class:`CgroupError` or :class:`ProtectedProcess`, so nothing is half done."""
        rel = subject.cgroup
        if rel in ("", "/"):
            raise CgroupError(f"refusing to {what} the root cgroup", pid=subject.pid, cgroup=rel)
        if not subject.cgroup_inode:
            raise CgroupError(
                f"refusing to {what}: its cgroup's inode was not read at identification",
                pid=subject.pid,
                cgroup=rel,
            )
        if self.cgroups.inode(rel) != subject.cgroup_inode:
            raise CgroupError(
                f"refusing to {what}: the cgroup was replaced since identification",
                pid=subject.pid,
                cgroup=rel,
            )
        self._same_cgroup_everywhere(subject, rel, what)
        agent = os.getpid()
        for pid in self.cgroups.subtree_members(rel):
            why = "pid 1 (init)" if pid == 1 else "the agent itself" if pid == agent else None
            if why is None:
                try:
                    info = self.procfs.read(pid)
                except ActionError:
                    continue  # exited meanwhile
                why = self.spare(info)
            if why:
                raise ProtectedProcess(
                    f"refusing to {what}: its cgroup (or one below it) holds protected "
                    f"pid {pid} ({why})",
                    pid=subject.pid,
                    cgroup=rel,
                )
        return rel

    def _same_cgroup_everywhere(self, subject: Subject, rel: str, what: str) -> None:
        """v1 names a process's cgroup by its pids path, but an action in place writes at that
        path in other hierarchies too (cpu, memory, freezer). Where the process's own cgroup
        there has another path, the directory of that name is somebody else's: refused."""
        if self.cgroups.version != 1 or subject.pid <= 0:
            # v2: one hierarchy, the path is the cgroup. A cgroup offender: named by its pids
            # directory, with no process to ask.
            return
        try:
            origins = self.cgroups.origins(
                checked(subject.pid, subject.handle, "reading its cgroups")
            )
        except ActionError as err:
            raise CgroupError(
                f"refusing to {what}: cannot read where it is", pid=subject.pid, cgroup=rel
            ) from err
        for hierarchy in self.cgroups.hierarchies_with(rel):
            if hierarchy in origins and origins[hierarchy] != rel:
                raise CgroupError(
                    f"refusing to {what}: in the {hierarchy} hierarchy its cgroup is "
                    f"{origins[hierarchy]}, and {rel} there is another cgroup",
                    pid=subject.pid,
                    cgroup=rel,
                )

    @contextlib.contextmanager
    def pinned_reach(
        self, subject: Subject, started_before_ns: int
    ) -> Iterator[list[ProcessHandle]]:
        """Every process the action reaches beyond the offender (scope tree: its descendants;
        scope cgroup: the other members of its cgroup, behind the reach gate), each pinned by a
        pidfd *before* it is judged: the
        protection test, the start-time test and the scope test (still a member of the cgroup,
        still a descendant) all read the pinned process, so whatever is then signalled, moved
        or reniced through the handle is the process that was judged, never a pid reused in
        between. All handles are closed on exit."""
        if self.scope == "cgroup":
            self.gate_cgroup(subject, "reach every process of the cgroup")
        candidates = (
            self.cgroups.members(subject.cgroup)
            if self.scope == "cgroup"
            else self._descendants(subject.pid)
            if self.scope == "tree"
            else []
        )

        def bind(pid: int) -> ProcessHandle | None:
            if pid == subject.pid:
                return None
            # Gone, or started after the decision: not one we judged.
            return ProcessHandle.bind(pid, self.procfs, started_before_ns=started_before_ns)

        with _pinned(candidates, bind, lambda hs: self._still_in_scope(subject, hs)) as handles:
            yield handles

    def _still_in_scope(
        self, subject: Subject, handles: list[ProcessHandle]
    ) -> list[ProcessHandle]:
        """The pinned processes that are unprotected and still in the scope (their pids are
        theirs while pinned and alive, so these reads are about them)."""
        live = [h for h in handles if not h.has_exited() and not self.spare(h.info)]
        if self.scope == "cgroup":
            members = set(self.cgroups.members(subject.cgroup))
            return [h for h in live if h.pid in members]
        # Tree: a descendant's parent is the offender or another kept descendant.
        kept: dict[int, ProcessHandle] = {}
        parents = {subject.pid}
        grew = True
        while grew:
            grew = False
            for h in live:
                if h.pid not in kept and h.info.ppid in parents:
                    kept[h.pid] = h
                    parents.add(h.pid)
                    grew = True
        return [h for h in live if h.pid in kept]

    @contextlib.contextmanager
    def pinned_members(self, rel: str, *, anywhere: bool = False) -> Iterator[list[ProcessHandle]]:
        """The members of cgroup ``rel`` (``anywhere``: in any v1 hierarchy), each pinned and
        then checked to still be a member (a pid read from cgroup.procs may belong to someone
        else by the time it is pinned)."""
        read = self.cgroups.members_anywhere if anywhere else self.cgroups.members

        def still_members(handles: list[ProcessHandle]) -> list[ProcessHandle]:
            members = set(read(rel))
            return [h for h in handles if h.pid in members and not h.has_exited()]

        with _pinned(
            read(rel), lambda pid: ProcessHandle.bind(pid, self.procfs), still_members
        ) as handles:
            yield handles

    def _descendants(self, root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid in self.procfs.pids():
            try:
                children.setdefault(self.procfs.read(pid).ppid, []).append(pid)
            except ActionError:
                continue
        found, todo = [], [root]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found


@contextlib.contextmanager
def _pinned(
    pids: Iterable[int],
    bind: Callable[[int], ProcessHandle | None],
    judge: Callable[[list[ProcessHandle]], list[ProcessHandle]],
) -> Iterator[list[ProcessHandle]]:
    """Pin each of ``pids`` (``bind``; None or an ActionError skips it), *then* judge the
    pinned processes (``judge`` keeps those still meant): a pid reused between the listing and
    the pin is judged as what it is now. Every handle is closed on exit."""
    handles: list[ProcessHandle] = []
    try:
        for pid in pids:
            with contextlib.suppress(ActionError):
                handle = bind(pid)
                if handle is not None:
                    handles.append(handle)
        kept = judge(handles)
        for handle in handles:
            if handle not in kept:
                handle.close()
        handles = kept
        yield handles
    finally:
        for handle in handles:
            handle.close()


def checked(pid: int, handle: Handle | None, what: str) -> int:
    """``pid`` for an operation that only takes a number (a cgroup move), right after checking
    through its pidfd that the process has not exited: until it is reaped nobody else can hold
    the pid. The residual race is the microseconds between this check and the write."""
    if pid <= 0:
        # Never a process: written to cgroup.procs, 0 would move the agent itself.
        raise ActionError(f"refusing {what}: pid {pid} is not a process", pid=pid)
    if handle is not None and handle.has_exited():
        raise ProcessGone(f"exited before {what}", pid=pid)
    return pid


class Action(Protocol):
    """A playbook step's implementation. Guards, dry-run and cooldowns belong to the engine."""

    name: str

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        """What running it would do, in words ("quarantine pid 42 (x) into ...")."""
        ...

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        """Do it; return details for the audit line; raise ActionError subclasses on failure."""
        ...
