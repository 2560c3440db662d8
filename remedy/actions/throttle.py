"""Cgroup actions: throttle_cpu, limit_memory, limit_pids, freeze, thaw, io_weight.

Where a limit lands depends on the step's scope:

* ``cgroup``: the offender's own cgroup, in place. Refused when it holds the agent or any
  process the engine's protector spares, and when the cgroup was replaced (a different inode)
  since the undo record was taken.
* ``process`` / ``tree``: the offender (and its descendants) move into the offender's own
  quarantine cgroup and the limit applies there, so a shared cgroup is never limited for one
  offender's sake.

Every action here is :class:`Reversible`: the engine calls :meth:`undo` *before* :meth:`run`
(the record is journaled first) and :meth:`revert` on TTL, recovery or removal.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import ClassVar, Protocol

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import Limits
from remedy.actions.params import (
    ActionParams,
    FreezeParams,
    IoWeightParams,
    LimitMemoryParams,
    LimitPidsParams,
    ThawParams,
    ThrottleCpuParams,
)
from remedy.actions.undo import UndoRecord
from remedy.engine.offender import Subject
from remedy.errors import ActionError, CgroupError, ProcessGone

__all__ = [
    "INODE_KEY",
    "CgroupAction",
    "Freeze",
    "IoWeight",
    "LimitMemory",
    "LimitPids",
    "Reversible",
    "Thaw",
    "ThrottleCpu",
    "new_record",
]

INODE_KEY = "@inode"
"""Key in :attr:`UndoRecord.previous` holding the inode of the cgroup written in place: not a
knob, so :meth:`CgroupAction.revert` takes it out before restoring the knobs."""


class Reversible(Protocol):
    """An action whose change can be taken back.

    ``undo`` is called before ``run`` and returns what to journal; it must not change anything.
    ``revert`` restores the record and must be idempotent (reverting twice is harmless): it
    runs again after a crash between revert and the journal's note of it.
    """

    name: str

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
        """Capture the previous state of what :meth:`run` is about to change."""
        ...

    def revert(self, record: UndoRecord, ctx: ActionContext) -> str:
        """Restore ``record``; return details for the audit line."""
        ...


def new_record(
    action: str,
    subject: Subject,
    cgroup: str,
    *,
    policy: str,
    ttl_s: float,
    now_wall: float,
    previous: dict[str, str] | None = None,
    original_cgroup: str | None = None,
    pids: tuple[int, ...] = (),
) -> UndoRecord:
    """An :class:`UndoRecord` with a fresh uuid4 id, expiring ``ttl_s`` after ``now_wall``."""
    return UndoRecord(
        id=uuid.uuid4().hex,
        action=action,
        policy=policy,
        pid=subject.pid,
        start_ticks=subject.start_ticks,
        cgroup=cgroup,
        created=now_wall,
        expires=now_wall + ttl_s,
        previous=dict(previous or {}),
        original_cgroup=original_cgroup,
        pids=pids,
    )


def move_back(rel: str, original: str, ctx: ActionContext) -> str:
    """Move every member of quarantine ``rel`` back to ``original`` (those that exited are
    skipped) and remove the quarantine once it is empty."""
    moved = 0
    for pid in ctx.cgroups.members(rel):
        try:
            ctx.cgroups.move(pid, original)
            moved += 1
        except ProcessGone:
            continue
    removed = ""
    if not ctx.cgroups.members(rel):
        with contextlib.suppress(CgroupError):
            ctx.cgroups.remove(rel)
            removed = ", removed the quarantine"
    return f"moved {moved} task(s) back to {original}{removed}"


def _boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class CgroupAction:
    """One limit on one cgroup; subclasses say which knob and which value."""

    name: str
    knob: ClassVar[str]

    def __init__(self) -> None:
        # Inodes seen by undo(), re-checked by run() right before it writes: (pid, ticks, rel).
        self._inodes: dict[tuple[int, int, str], int] = {}

    def limits(self, params: ActionParams) -> Limits:
        """The limit this step sets."""
        raise NotImplementedError

    def words(self, params: ActionParams) -> str:
        """The limit in words, for describe() and the audit line."""
        raise NotImplementedError

    # --- the Action protocol -----------------------------------------------------------------

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        if ctx.scope == "cgroup":
            return f"{self.words(params)} on its whole cgroup {subject.cgroup_display} in place"
        target = ctx.cgroups.display_path(ctx.quarantine_of(subject))
        tree = ", with its descendants," if ctx.scope == "tree" else ""
        return f"moving it{tree} into {target}, {self.words(params)} there"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        limits = self.limits(params)
        if ctx.scope == "cgroup":
            rel = subject.cgroup
            self._refuse_shared(rel, ctx)
            expected = self._inodes.pop((*subject.key, rel), None)
            self._check_inode(rel, expected, ctx)
            ctx.cgroups.apply(rel, limits)
            n = len(ctx.cgroups.members(rel))
            return f"{self.words(params)} on {subject.cgroup_display} in place ({n} task(s))"
        rel = ctx.quarantine_of(subject)
        # Moving is by pid: while the pinned offender has not exited its pid cannot be reused.
        if subject.handle is not None and subject.handle.has_exited():
            raise ProcessGone(f"exited before {self.name}", pid=subject.pid, cgroup=rel)
        now_ns = _boot_ns()
        expected = self._inodes.pop((*subject.key, rel), None)
        if expected is not None:  # the quarantine existed when the record was taken
            self._check_inode(rel, expected, ctx)
        if limits.frozen:
            # Freeze after the move, so the wait for FROZEN covers the moved tasks.
            ctx.cgroups.create(rel, Limits(frozen=False))
        else:
            ctx.cgroups.create(rel, limits)
        ctx.cgroups.move(subject.pid, rel)
        for pid in ctx.reach(subject, now_ns):  # scope tree: its descendants follow it
            with contextlib.suppress(ProcessGone):
                ctx.cgroups.move(pid, rel)
        if limits.frozen:
            ctx.cgroups.apply(rel, limits)
        n = len(ctx.cgroups.members(rel))
        return f"{self.words(params)} on {n} task(s) in {ctx.cgroups.display_path(rel)}"

    # --- Reversible ---------------------------------------------------------------------------

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
        """In place: the knob's current raw value and the cgroup's inode. Into a quarantine
        that does not exist yet: nothing to restore, only the processes to move back to
        ``subject.cgroup`` (revert then removes the quarantine)."""
        if len(self._inodes) > 4096:  # undo() without run(): never let the memo grow
            self._inodes.clear()
        if ctx.scope == "cgroup":
            rel = subject.cgroup
            self._refuse_shared(rel, ctx)
            ino = ctx.cgroups.inode(rel)
            previous = ctx.cgroups.read_knobs(rel, [self.knob])
            previous[INODE_KEY] = str(ino)
            self._inodes[(*subject.key, rel)] = ino
            return new_record(
                self.name,
                subject,
                rel,
                policy=policy,
                ttl_s=ttl_s,
                now_wall=now_wall,
                previous=previous,
                pids=tuple(ctx.cgroups.members(rel)),
            )
        rel = ctx.quarantine_of(subject)
        pids = (subject.pid, *ctx.reach(subject, _boot_ns()))
        if not ctx.cgroups.exists(rel):
            return new_record(
                self.name,
                subject,
                rel,
                policy=policy,
                ttl_s=ttl_s,
                now_wall=now_wall,
                original_cgroup=subject.cgroup,
                pids=pids,
            )
        # An existing quarantine (an earlier step made it): that step owns the move; this
        # record only restores the knob.
        ino = ctx.cgroups.inode(rel)
        try:
            previous = ctx.cgroups.read_knobs(rel, [self.knob])
        except CgroupError:
            # v1: the quarantine is not in this knob's hierarchy yet; run() creates it there
            # with the kernel's default, which there is no need to restore.
            previous = {}
        previous[INODE_KEY] = str(ino)
        self._inodes[(*subject.key, rel)] = ino
        return new_record(
            self.name,
            subject,
            rel,
            policy=policy,
            ttl_s=ttl_s,
            now_wall=now_wall,
            previous=previous,
            pids=pids,
        )

    def revert(self, record: UndoRecord, ctx: ActionContext) -> str:
        """Restore the previous raw values; for a quarantine made by this step, thaw it, move
        its members back to ``original_cgroup`` (those that exited are skipped) and remove it.
        A cgroup that is gone has nothing left to restore; one that was replaced is refused."""
        rel = record.cgroup
        previous = dict(record.previous)
        inode = previous.pop(INODE_KEY, None)
        if not ctx.cgroups.exists(rel):
            return f"{rel} is gone: nothing to restore"
        if inode is not None and ctx.cgroups.inode(rel) != int(inode):
            raise CgroupError("cgroup was replaced", cgroup=rel)
        if record.original_cgroup is None:
            if previous:
                ctx.cgroups.write_knobs(rel, previous)
            restored = ", ".join(f"{k}={v}" for k, v in previous.items()) or "nothing"
            return f"restored {restored} on {ctx.cgroups.display_path(rel)}"
        if self.knob == "frozen":
            # Thaw before moving out: a task must not leave frozen (v1 keeps it FREEZING).
            ctx.cgroups.apply(rel, Limits(frozen=False))
        return move_back(rel, record.original_cgroup, ctx)

    # --- checks -------------------------------------------------------------------------------

    @staticmethod
    def _refuse_shared(rel: str, ctx: ActionContext) -> None:
        """A cgroup limited in place must hold neither the agent nor a spared process."""
        if rel in ("", "/"):
            raise CgroupError("refusing to limit the root cgroup in place", cgroup=rel)
        agent = os.getpid()
        for pid in ctx.cgroups.members(rel):
            if pid == agent:
                raise CgroupError("refusing: the cgroup contains the agent", pid=pid, cgroup=rel)
            try:
                info = ctx.procfs.read(pid)
            except ActionError:
                continue  # exited meanwhile
            why = ctx.spare(info)
            if why:
                raise CgroupError(
                    f"refusing: the cgroup contains protected {info.comm} ({why})",
                    pid=pid,
                    cgroup=rel,
                )

    @staticmethod
    def _check_inode(rel: str, expected: int | None, ctx: ActionContext) -> None:
        if expected is not None and ctx.cgroups.inode(rel) != expected:
            raise CgroupError("cgroup was replaced", cgroup=rel)


class ThrottleCpu(CgroupAction):
    """Cap CPU at a number of cores (cpu.max; v1 cpu.cfs_quota_us)."""

    name = "throttle_cpu"
    knob = "cpu_cores"

    def limits(self, params: ActionParams) -> Limits:
        assert isinstance(params, ThrottleCpuParams)
        return Limits(cpu_cores=params.cpu)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, ThrottleCpuParams)
        return f"cpu {params.cpu:g} core(s)"


class LimitMemory(CgroupAction):
    """Reclaim above a size (memory.high; v1 memory.soft_limit_in_bytes, see cgroups.KNOBS)."""

    name = "limit_memory"
    knob = "memory_high"

    def limits(self, params: ActionParams) -> Limits:
        assert isinstance(params, LimitMemoryParams)
        return Limits(memory_high=params.high)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, LimitMemoryParams)
        return f"memory high {params.high} bytes"


class LimitPids(CgroupAction):
    """Cap the number of tasks (pids.max)."""

    name = "limit_pids"
    knob = "pids_max"

    def limits(self, params: ActionParams) -> Limits:
        assert isinstance(params, LimitPidsParams)
        return Limits(pids_max=params.max)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, LimitPidsParams)
        return f"pids.max {params.max}"


class Freeze(CgroupAction):
    """Freeze every task (cgroup.freeze; v1 freezer.state), waiting up to 1 s for it."""

    name = "freeze"
    knob = "frozen"

    def limits(self, params: ActionParams) -> Limits:
        assert isinstance(params, FreezeParams)
        return Limits(frozen=True)

    def words(self, params: ActionParams) -> str:
        return "frozen"


class Thaw(CgroupAction):
    """Thaw every task."""

    name = "thaw"
    knob = "frozen"

    def limits(self, params: ActionParams) -> Limits:
        assert isinstance(params, ThawParams)
        return Limits(frozen=False)

    def words(self, params: ActionParams) -> str:
        return "thawed"


class IoWeight(CgroupAction):
    """Proportional IO weight (io.weight; v1 blkio.weight clamped to 10..1000). A host without
    the io controller fails the step with "io controller not available"."""

    name = "io_weight"
    knob = "io_weight"

    def limits(self, params: ActionParams) -> Limits:
        assert isinstance(params, IoWeightParams)
        return Limits(io_weight=params.weight)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, IoWeightParams)
        return f"io weight {params.weight}"
