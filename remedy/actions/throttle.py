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
import time
import uuid
from dataclasses import replace
from typing import ClassVar, Protocol

from remedy.actions.base import ActionContext, checked
from remedy.actions.cgroups import INHERITED, V1_HIERARCHIES, Limits, within
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
from remedy.engine.offender import Handle, Subject
from remedy.errors import CgroupError, ProcessGone

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
    "into_quarantine",
    "kept_words",
    "move_back",
    "new_record",
    "revert_quarantine",
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
    origins: dict[str, dict[str, str]] | None = None,
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
        origins=dict(origins or {}),
    )


def record_origins(
    subject: Subject, pids: tuple[int, ...], ctx: ActionContext
) -> dict[str, dict[str, str]]:
    """Where each process about to be moved is, per hierarchy (str(pid) -> {hierarchy: path}),
    for the undo record. The offender's must be readable (else nothing is moved); one of the
    others that exited meanwhile will not be moved either."""
    found = {str(subject.pid): ctx.cgroups.origins(subject.pid)}
    for pid in pids:
        if pid != subject.pid:
            with contextlib.suppress(ProcessGone):
                found[str(pid)] = ctx.cgroups.origins(pid)
    return found


def current_limits(rel: str, knobs: list[str], ctx: ActionContext) -> Limits:
    """What ``rel`` holds now for ``knobs``; a knob not readable there (v1: not created in that
    hierarchy yet) has the kernel's default, no cap."""
    raw: dict[str, str] = {}
    for knob in knobs:
        with contextlib.suppress(CgroupError):
            raw.update(ctx.cgroups.read_knobs(rel, [knob]))
    return Limits.from_raw(ctx.cgroups.version, raw)


# A move that only means to contain (quarantine, throttle_cpu, limit_pids, freeze: steps that
# never end a process) but carries a memory room below this (v2, where memory moves with the
# process) would be an OOM kill at its next allocations, where it is the only candidate (at
# home the kernel may reclaim or pick another): refused, so the playbook escalates through
# steps that say they can end one.
MEMORY_ROOM_FLOOR = 64 << 20


def _refuse_an_oom_kill(pid: int, inherited: Limits, wanted: Limits, rel: str) -> None:
    room = inherited.memory_max
    if room is None or room >= MEMORY_ROOM_FLOOR:
        return
    if wanted.memory_max is not None:
        return  # limit_memory: a step that says it can end a process (guarded as one)
    raise CgroupError(
        f"refusing to move it into a quarantine: its cgroups have only {room >> 20} MiB of "
        f"memory left (under {MEMORY_ROOM_FLOOR >> 20} MiB), so the move would be an OOM kill",
        pid=pid,
        cgroup=rel,
    )


def into_quarantine(
    subject: Subject,
    rel: str,
    wanted: Limits,
    ctx: ActionContext,
    *,
    may_loosen: tuple[str, ...] = (),
) -> Limits:
    """Move the offender (and what :meth:`ActionContext.reach` adds) into quarantine ``rel``
    without loosening anything: ``wanted`` is tightened by every limit the moved processes
    were under (:meth:`CgroupDriver.inherited`) and by what ``rel`` already holds. Returns the
    limits applied. ``may_loosen`` names knobs the step may set looser (thaw)."""
    with ctx.pinned_reach(subject, _boot_ns()) as reached:
        movers: list[tuple[int, Handle | None]] = [
            (subject.pid, subject.handle),
            *((h.pid, h) for h in reached),
        ]
        limits = wanted
        for pid, handle in movers:
            try:
                origins = ctx.cgroups.origins(checked(pid, handle, "reading its cgroups"))
            except ProcessGone:
                if pid == subject.pid:
                    raise
                continue
            # A hierarchy where it is in the quarantine already (an earlier step moved it) has
            # nothing to carry: the quarantine's own values are kept below, as they are.
            outside = {h: path for h, path in origins.items() if not within(path, rel)}
            inherited = ctx.cgroups.inherited(outside, ctx.cgroups.carried(wanted))
            _refuse_an_oom_kill(pid, inherited, wanted, rel)
            limits = limits.tightened(inherited.without(*may_loosen))
        if ctx.cgroups.exists(rel):  # an earlier step's caps stay
            held = current_limits(rel, [k for k in INHERITED if k not in may_loosen], ctx)
            limits = limits.tightened(held)
        # Freeze after the moves, so the wait for FROZEN covers the moved tasks.
        ctx.cgroups.create(rel, replace(limits, frozen=False) if limits.frozen else limits)
        for i, (pid, handle) in enumerate(movers):  # scope tree: its descendants follow it
            try:
                # A move takes a pid number: checked through the pidfd right before it.
                ctx.cgroups.move(checked(pid, handle, "its move into quarantine"), rel)
            except ProcessGone:
                if i == 0:
                    raise
    if limits.frozen:
        ctx.cgroups.apply(rel, Limits(frozen=True))
    return limits


MOVE_BACK_PASSES = 5
"""Passes over a quarantine's members when moving them back (see :func:`move_back`)."""


def move_back(rel: str, record: UndoRecord, ctx: ActionContext) -> str:
    """Move every member of quarantine ``rel`` (in any hierarchy) back where it came from, per
    hierarchy, and remove the quarantine. Members with no origin of their own (forked inside)
    go where the offender came from. Those that exited are skipped. Raises CgroupError, so the
    record stays open, while any member is still in the quarantine in any hierarchy."""
    fallback = record.origins.get(str(record.pid))
    if fallback is None:  # a record from before per-hierarchy origins: one path for all
        legacy = record.original_cgroup or "/"
        fallback = {h: legacy for h in ("", *V1_HIERARCHIES)}
    moved, failures = 0, list[str]()
    # A member that forks between our read of the members and its own move leaves its child
    # born in the quarantine: a live fork storm did so about one revert in three. A few passes
    # catch them, as the kill's sweep does.
    for _ in range(MOVE_BACK_PASSES):
        failures.clear()  # the last pass says why
        with ctx.pinned_members(rel, anywhere=True) as members:
            if not members:
                break
            for member in members:
                try:
                    pid = checked(member.pid, member, "its move back")
                    ctx.cgroups.restore(pid, rel, record.origins.get(str(pid), fallback))
                    moved += 1
                except ProcessGone:
                    continue
                except CgroupError as err:
                    failures.append(str(err))
    left = ctx.cgroups.members_anywhere(rel)
    if left:
        why = "; ".join(failures) or "they did not leave"
        raise CgroupError(
            f"moved {moved} task(s) back, {len(left)} still in the quarantine: {why}", cgroup=rel
        )
    ctx.cgroups.remove(rel)
    homes = record.origins.get(str(record.pid)) or {"": record.original_cgroup or "/"}
    where = ", ".join(f"{h}:{p}" if h else p for h, p in sorted(homes.items()))
    return f"moved {moved} task(s) back to {where}, removed the quarantine"


def revert_quarantine(rel: str, record: UndoRecord, ctx: ActionContext) -> str:
    """Take back a move into quarantine ``rel``: thaw it (a task must not leave frozen: v1
    keeps it FREEZING), then :func:`move_back`. Gone only when it is gone in every hierarchy."""
    if not ctx.cgroups.exists(rel) and not ctx.cgroups.members_anywhere(rel):
        with contextlib.suppress(CgroupError):  # an empty leftover in another hierarchy
            ctx.cgroups.remove(rel)
        return f"{rel} is gone: nothing to restore"
    # Not only for a freeze step: a quarantine also keeps an origin's freeze (inherited).
    if current_limits(rel, ["frozen"], ctx).frozen:
        ctx.cgroups.apply(rel, Limits(frozen=False))
    return move_back(rel, record, ctx)


def kept_words(wanted: Limits, applied: Limits) -> str:
    """Audit words for the caps kept tighter than the step asked."""
    kept = [
        f"{k} {getattr(applied, k)}"
        for k in applied.knobs()
        if getattr(applied, k) != getattr(wanted, k)
    ]
    return f" (kept tighter, as it was under: {', '.join(kept)})" if kept else ""


def _boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class CgroupAction:
    """One limit on one cgroup; subclasses say which knob and which value.

    It only ever tightens: in place, each value written is the smaller of the step's and the
    cgroup's own; into a quarantine, also of every limit the process was under where it came
    from (:func:`into_quarantine`). Only :class:`Thaw` may loosen, and only ``frozen``.
    """

    name: str
    knob: ClassVar[str]
    may_loosen: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        # Inodes seen by undo(), re-checked by run() right before it writes: (pid, ticks, rel).
        self._inodes: dict[tuple[int, int, str], int] = {}

    def limits(self, params: ActionParams, version: int) -> Limits:
        """The limit this step sets on a cgroup ``version`` host."""
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
        wanted = self.limits(params, ctx.cgroups.version)
        if ctx.scope == "cgroup":
            rel = ctx.gate_cgroup(subject, f"{self.name} in place")
            expected = self._inodes.pop((*subject.key, rel), None)
            self._check_inode(rel, expected, ctx)
            # Ancestors' limits still apply in place (every v1/v2 limit is hierarchical); only
            # the cgroup's own value could be looser than the step's.
            knobs = [k for k in wanted.knobs() if k in INHERITED and k not in self.may_loosen]
            held = current_limits(rel, knobs, ctx)
            applied = wanted.tightened(held)
            ctx.cgroups.apply(rel, applied)
            n = len(ctx.cgroups.members(rel))
            kept = kept_words(wanted, applied)
            return f"{self.words(params)} on {subject.cgroup_display} in place ({n} task(s)){kept}"
        rel = ctx.quarantine_of(subject)
        # Moving is by pid: while the pinned offender has not exited its pid cannot be reused.
        if subject.handle is not None and subject.handle.has_exited():
            raise ProcessGone(f"exited before {self.name}", pid=subject.pid, cgroup=rel)
        expected = self._inodes.pop((*subject.key, rel), None)
        if expected is not None:  # the quarantine existed when the record was taken
            self._check_inode(rel, expected, ctx)
        applied = into_quarantine(subject, rel, wanted, ctx, may_loosen=self.may_loosen)
        n = len(ctx.cgroups.members(rel))
        where = ctx.cgroups.display_path(rel)
        return f"{self.words(params)} on {n} task(s) in {where}{kept_words(wanted, applied)}"

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
        """In place: the knobs' current raw values and the cgroup's inode. Into a quarantine
        that does not exist yet: nothing to restore, only the processes to move back, each to
        its own origin in every hierarchy (revert then removes the quarantine)."""
        if len(self._inodes) > 4096:  # undo() without run(): never let the memo grow
            self._inodes.clear()
        if ctx.scope == "cgroup":
            rel = ctx.gate_cgroup(subject, f"{self.name} in place")
            ino = ctx.cgroups.inode(rel)
            previous = ctx.cgroups.read_knobs(rel, self._written(params, ctx))
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
        pids = (subject.pid, *ctx.reach_pids(subject, _boot_ns()))
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
                origins=record_origins(subject, pids, ctx),
            )
        # An existing quarantine (an earlier step made it): that step owns the move; this
        # record only restores the knobs.
        ino = ctx.cgroups.inode(rel)
        previous = {}
        for knob in self._written(params, ctx):
            try:
                previous.update(ctx.cgroups.read_knobs(rel, [knob]))
            except CgroupError:
                # v1: the quarantine is not in this knob's hierarchy yet; run() creates it
                # there with the kernel's default, which there is no need to restore.
                continue
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

    def _written(self, params: ActionParams, ctx: ActionContext) -> list[str]:
        return self.limits(params, ctx.cgroups.version).knobs()

    def revert(self, record: UndoRecord, ctx: ActionContext) -> str:
        """Restore the previous raw values; for a quarantine made by this step, thaw it, move
        its members back to their origins (those that exited are skipped) and remove it.
        A cgroup that is gone or was replaced has nothing of ours left: never written to."""
        rel = record.cgroup
        previous = dict(record.previous)
        inode = previous.pop(INODE_KEY, None)
        if record.original_cgroup is not None:
            return revert_quarantine(rel, record, ctx)
        if not ctx.cgroups.exists(rel):
            return f"{rel} is gone: nothing to restore"
        if inode is not None and ctx.cgroups.inode(rel) != int(inode):
            # Our writes went with the cgroup they were made to; the new one is not ours to
            # touch. Nothing is left to restore (as Quarantine.revert), so the record closes
            # instead of being retried for ever.
            return f"{rel} was replaced since: nothing of ours to restore"
        if previous:
            ctx.cgroups.write_knobs(rel, previous)
        restored = ", ".join(f"{k}={v}" for k, v in previous.items()) or "nothing"
        return f"restored {restored} on {ctx.cgroups.display_path(rel)}"

    # --- checks -------------------------------------------------------------------------------

    @staticmethod
    def _check_inode(rel: str, expected: int | None, ctx: ActionContext) -> None:
        if expected is not None and ctx.cgroups.inode(rel) != expected:
            raise CgroupError("cgroup was replaced", cgroup=rel)


class ThrottleCpu(CgroupAction):
    """Cap CPU at a number of cores (cpu.max; v1 cpu.cfs_quota_us)."""

    name = "throttle_cpu"
    knob = "cpu_cores"

    def limits(self, params: ActionParams, version: int) -> Limits:
        assert isinstance(params, ThrottleCpuParams)
        return Limits(cpu_cores=params.cpu)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, ThrottleCpuParams)
        return f"cpu {params.cpu:g} core(s)"


class LimitMemory(CgroupAction):
    """Hold a grower at a size. v2: memory.high (reclaim and throttle above ``high``) and
    memory.max when ``max`` is given. v1 has no memory.high and its soft limit stops nothing
    on a host with free memory, so v1 writes memory.limit_in_bytes (``max``, else ``high``):
    the kernel reclaims, then OOM-kills inside the cgroup, at the limit. A limit the kernel
    cannot hold (v1: usage above it that reclaim cannot free, EBUSY) fails the step with
    CgroupError, which the playbook escalates on."""

    name = "limit_memory"
    knob = "memory_high"

    def limits(self, params: ActionParams, version: int) -> Limits:
        assert isinstance(params, LimitMemoryParams)
        hard = params.max if params.max is not None or version != 1 else params.high
        return Limits(memory_high=params.high, memory_max=hard)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, LimitMemoryParams)
        hard = f", max {params.max} bytes" if params.max is not None else ""
        return f"memory high {params.high} bytes{hard}"


class LimitPids(CgroupAction):
    """Cap the number of tasks (pids.max)."""

    name = "limit_pids"
    knob = "pids_max"

    def limits(self, params: ActionParams, version: int) -> Limits:
        assert isinstance(params, LimitPidsParams)
        return Limits(pids_max=params.max)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, LimitPidsParams)
        return f"pids.max {params.max}"


class Freeze(CgroupAction):
    """Freeze every task (cgroup.freeze; v1 freezer.state), waiting up to 1 s for it."""

    name = "freeze"
    knob = "frozen"

    def limits(self, params: ActionParams, version: int) -> Limits:
        assert isinstance(params, FreezeParams)
        return Limits(frozen=True)

    def words(self, params: ActionParams) -> str:
        return "frozen"


class Thaw(CgroupAction):
    """Thaw every task."""

    name = "thaw"
    knob = "frozen"
    may_loosen = ("frozen",)  # thawing is the point; every other cap still only tightens

    def limits(self, params: ActionParams, version: int) -> Limits:
        assert isinstance(params, ThawParams)
        return Limits(frozen=False)

    def words(self, params: ActionParams) -> str:
        return "thawed"


class IoWeight(CgroupAction):
    """Proportional IO weight (io.weight; v1 blkio.weight clamped to 10..1000). A host without
    the io controller fails the step with "io controller not available"."""

    name = "io_weight"
    knob = "io_weight"

    def limits(self, params: ActionParams, version: int) -> Limits:
        assert isinstance(params, IoWeightParams)
        return Limits(io_weight=params.weight)

    def words(self, params: ActionParams) -> str:
        assert isinstance(params, IoWeightParams)
        return f"io weight {params.weight}"
