"""One interface over cgroup v1 (through cgroupspy) and cgroup v2 (through its files).

Cgroups are named by their path relative to the hierarchy root ("/remedy/q-42-1234"), the form
/proc/pid/cgroup uses; :meth:`CgroupDriver.display_path` turns that into a filesystem path for
humans. Every OSError is translated here, once, into :class:`CgroupError` (or
:class:`ProcessGone` when the pid being moved has exited).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from cgroupspy.controllers import Controller
from cgroupspy.interfaces import BaseFileInterface
from cgroupspy.nodes import Node

from remedy.errors import CgroupError, ProcessGone
from remedy.proc import ProcFS

__all__ = [
    "KNOBS",
    "CgroupDriver",
    "CgroupV1Driver",
    "CgroupV2Driver",
    "FreezerController",
    "Limits",
    "PidsController",
    "RemedyNode",
    "detect",
    "within",
]

# The CFS bandwidth period we always use (the kernel default, 100 ms).
CPU_PERIOD_US = 100_000
# kernel/sched/core.c: min_cfs_quota_period is 1 ms; a smaller quota is refused with EINVAL.
_MIN_QUOTA_US = 1_000
# The v2 controllers a quarantine needs enabled down the tree.
_V2_CONTROLLERS = ("pids", "cpu")
# How long a freeze may take to settle (FREEZING -> FROZEN) before we call it failed.
_FREEZE_WAIT_S = 1.0

KNOBS = ("pids_max", "cpu_cores", "memory_max", "memory_high", "frozen", "io_weight")
"""The names of the limits a driver reads and writes raw (:meth:`CgroupDriver.read_knobs`).

Raw values are what the kernel files hold, per version:

==============  =========================================  ===========================
knob            v1 (hierarchy/file)                        v2 file
==============  =========================================  ===========================
pids_max        pids/pids.max ("max" or N)                 pids.max
cpu_cores       cpu/cpu.cfs_quota_us + cfs_period_us,      cpu.max ("max 100000")
                joined "quota period" ("-1 100000")
memory_max      memory/memory.limit_in_bytes               memory.max ("max" or N)
memory_high     memory/memory.soft_limit_in_bytes          memory.high ("max" or N)
frozen          freezer/freezer.state (THAWED/FROZEN)      cgroup.freeze ("0"/"1")
io_weight       blkio/blkio.weight (10..1000)              io.weight ("default 100")
==============  =========================================  ===========================

v1 has no memory.high. memory.soft_limit_in_bytes is its nearest relative, but it only orders
reclaim under *global* memory pressure: it never stops a grower on a host with free memory.
What holds one on v1 is memory.limit_in_bytes (reclaim, then the memcg OOM killer at the
limit), so ``limit_memory`` writes both there (see :class:`remedy.actions.throttle.LimitMemory`).
"""
# v1 knob -> hierarchy
_V1_HIERARCHY = {
    "pids_max": "pids",
    "cpu_cores": "cpu",
    "memory_max": "memory",
    "memory_high": "memory",
    "frozen": "freezer",
    "io_weight": "blkio",
}
# Every v1 hierarchy a process can be moved in, so every one whose origin undo must restore.
V1_HIERARCHIES = ("pids", "cpu", "memory", "freezer", "blkio")
_V2_FILE = {
    "pids_max": "pids.max",
    "cpu_cores": "cpu.max",
    "memory_max": "memory.max",
    "memory_high": "memory.high",
    "frozen": "cgroup.freeze",
    "io_weight": "io.weight",
}
# v2 knob -> the controller that must be enabled in the parent for the file to exist.
_V2_CONTROLLER_OF = {
    "pids_max": "pids",
    "cpu_cores": "cpu",
    "memory_max": "memory",
    "memory_high": "memory",
    "io_weight": "io",
}
# The limits a move must carry along (:meth:`CgroupDriver.inherited`). io_weight is not one:
# a weight is relative to its siblings, so copying it under another parent means nothing.
INHERITED = ("pids_max", "cpu_cores", "memory_max", "memory_high", "frozen")
# v1 reports "no limit" on memory as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB
# pages); anything this large is unlimited.
_V1_MEMORY_UNLIMITED = 1 << 62


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _min_f(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class Limits:
    """Caps for one cgroup; ``None`` leaves the kernel's value alone."""

    pids_max: int | None = None
    cpu_cores: float | None = None
    memory_high: int | None = None  # bytes (v1: memory.soft_limit_in_bytes, see KNOBS)
    frozen: bool | None = None
    io_weight: int | None = None  # 1..10000 (v2 io.weight); v1 clamps to blkio's 10..1000
    memory_max: int | None = None  # bytes (v1: memory.limit_in_bytes)

    def knobs(self) -> list[str]:
        """The names (from :data:`KNOBS`) of the limits that are set."""
        return [k for k in KNOBS if getattr(self, k) is not None]

    def tightened(self, other: Limits) -> Limits:
        """Both sets of caps at once: the smaller of each number, frozen if either is.

        This is how a move never loosens a limit: what the step asks for, tightened by what the
        process was already under (``None`` on either side means "no cap there").
        """
        return Limits(
            pids_max=_min(self.pids_max, other.pids_max),
            cpu_cores=_min_f(self.cpu_cores, other.cpu_cores),
            memory_high=_min(self.memory_high, other.memory_high),
            frozen=True
            if (self.frozen or other.frozen)
            else (self.frozen if self.frozen is not None else other.frozen),
            # A weight is a share relative to siblings, not a cap: the step's own stands.
            io_weight=self.io_weight if self.io_weight is not None else other.io_weight,
            memory_max=_min(self.memory_max, other.memory_max),
        )

    def without(self, *knobs: str) -> Limits:
        """A copy with ``knobs`` unset."""
        return Limits(**{k: None if k in knobs else getattr(self, k) for k in KNOBS})

    @classmethod
    def from_raw(cls, version: int, raw: dict[str, str]) -> Limits:
        """Parse raw values as :meth:`CgroupDriver.read_knobs` returns them ("no limit" is
        ``None``; a frozen cgroup is ``frozen=True``, a thawed one ``None``)."""
        values: dict[str, Any] = {}
        for knob, text in raw.items():
            values[knob] = _parse_raw(version, knob, text.strip())
        return cls(**values)

    def raw(self, version: int) -> dict[str, str]:
        """The set limits as raw file values for cgroup ``version`` (see :data:`KNOBS`)."""
        values: dict[str, str] = {}
        if self.pids_max is not None:
            values["pids_max"] = str(self.pids_max)
        quota = self.cpu_quota_us()
        if quota is not None:
            values["cpu_cores"] = f"{quota} {CPU_PERIOD_US}"
        if self.memory_max is not None:
            values["memory_max"] = str(self.memory_max)
        if self.memory_high is not None:
            values["memory_high"] = str(self.memory_high)
        if self.frozen is not None:
            if version == 1:
                values["frozen"] = "FROZEN" if self.frozen else "THAWED"
            else:
                values["frozen"] = "1" if self.frozen else "0"
        if self.io_weight is not None:
            if version == 1:
                values["io_weight"] = str(min(1000, max(10, self.io_weight)))
            else:
                values["io_weight"] = f"default {self.io_weight}"
        return values

    def cpu_quota_us(self) -> int | None:
        """CFS quota per :data:`CPU_PERIOD_US` for ``cpu_cores`` (at least the kernel's 1 ms)."""
        if self.cpu_cores is None:
            return None
        return max(_MIN_QUOTA_US, int(self.cpu_cores * CPU_PERIOD_US))


def _one(knob: str, value: int | float | bool | None) -> Limits:
    kwargs: dict[str, Any] = {knob: value}
    return Limits(**kwargs)


def _parse_raw(version: int, knob: str, text: str) -> int | float | bool | None:
    """One raw knob value as a number (``None`` = no limit), see :data:`KNOBS`."""
    if knob == "frozen":
        # v1 FREEZING counts: it is on its way to FROZEN and a move must not let a task out.
        return True if text in ("FROZEN", "FREEZING", "1") else None
    if knob == "cpu_cores":
        quota, _, period = text.partition(" ")
        if quota in ("max", "-1") or not period:
            return None
        return int(quota) / int(period)
    if knob == "io_weight":
        return int(text.rsplit(maxsplit=1)[-1])
    if text == "max":
        return None
    value = int(text)
    if version == 1 and knob.startswith("memory_") and value >= _V1_MEMORY_UNLIMITED:
        return None
    return value


class CgroupDriver(Protocol):
    """What actions need from a cgroup hierarchy, whichever version the host mounts.

    ``rel`` arguments are paths relative to the hierarchy root: they start with "/" and contain
    no ".." (anything else raises :class:`CgroupError`). Every method raises only
    :class:`CgroupError`, except :meth:`move` (:class:`ProcessGone` if the pid exited) and
    :meth:`cgroup_of` (:class:`ProcessGone` from /proc).
    """

    version: int
    root: Path

    def cgroup_of(self, pid: int) -> str:
        """The cgroup of ``pid`` relative to the hierarchy root ("/a/b"), as the kernel wrote
        it: where a cgroup name fakes lines of /proc/pid/cgroup, the reading whose
        cgroup.procs holds ``pid``. Raises :class:`CgroupError` naming the pid for a path this
        driver cannot act on ("/.." under a cgroup namespace) and :class:`ActionError` for a
        file no reading of which is proven."""
        ...

    def display_path(self, rel: str) -> str:
        """The absolute filesystem path of ``rel``, for humans and logs."""
        ...

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists (v1: in the pids hierarchy)."""
        ...

    def create(self, rel: str, limits: Limits) -> None:
        """Create ``rel`` (and its parents) if needed, then write every limit that is set."""
        ...

    def apply(self, rel: str, limits: Limits) -> None:
        """Write every limit that is set to the existing ``rel`` (never creates anything).

        A freeze waits up to 1 s for the kernel to report the cgroup frozen.
        """
        ...

    def inode(self, rel: str) -> int:
        """The inode of ``rel``'s directory (v1: in the pids hierarchy): a cgroup removed and
        created again under the same name has a different one."""
        ...

    def read_knobs(self, rel: str, knobs: Iterable[str]) -> dict[str, str]:
        """The current raw values of ``knobs`` (names from :data:`KNOBS`) in ``rel``, for undo."""
        ...

    def write_knobs(self, rel: str, values: dict[str, str]) -> None:
        """Write raw values as :meth:`read_knobs` returned them (restoring an undo record)."""
        ...

    def move(self, pid: int, rel: str) -> None:
        """Move the whole process ``pid`` (all its threads) into ``rel``."""
        ...

    def members(self, rel: str) -> list[int]:
        """The pids in ``rel`` itself (not its children); [] if it does not exist."""
        ...

    def hierarchies_with(self, rel: str) -> list[str]:
        """The hierarchies (names as :meth:`origins` keys them) where a cgroup ``rel``
        exists: an action in place on ``rel`` writes there."""
        ...

    def members_anywhere(self, rel: str) -> list[int]:
        """The pids in ``rel`` in *any* hierarchy (v1: a process half moved back sits in the
        quarantine of one hierarchy only); [] if it exists nowhere. v2: :meth:`members`."""
        ...

    def subtree_members(self, rel: str) -> list[int]:
        """The pids in ``rel`` and every cgroup below it, in any hierarchy: everything a
        freeze, a limit or cgroup.kill on ``rel`` reaches."""
        ...

    def origins(self, pid: int) -> dict[str, str]:
        """Where ``pid`` is, per hierarchy it can be moved in: v1 {"pids": "/a", "cpu": "/b",
        ...} from /proc/pid/cgroup (the lines may all differ); v2 {"": "/a"}. For undo."""
        ...

    def carried(self, wanted: Limits) -> tuple[str, ...]:
        """The knobs (of :data:`INHERITED`) a move into a quarantine made for ``wanted`` takes
        the process out from under, so the quarantine must carry them: v2 moves a process in
        its one hierarchy (all of them); v1 only in pids, cpu and the hierarchies ``wanted``
        sets a knob of (elsewhere it stays where it was, under exactly what it had)."""
        ...

    def inherited(self, origins: dict[str, str], knobs: Iterable[str] = INHERITED) -> Limits:
        """The limits (of ``knobs``) a process with these :meth:`origins` is under, from its
        cgroups and every ancestor up to (not including) the root: the smallest pids.max and
        CPU quota, frozen if any is, and for memory the smallest *room left*: the limit minus
        what is charged there and cannot be reclaimed (page cache, active and inactive file
        pages, is reclaimed before anything is OOM-killed, so it is not counted as used),
        because the pages it already has stay charged where they are when it moves (v1
        cannot move charges on Linux 6.x, v2 never does). A move that applies these keeps
        every cap."""
        ...

    def restore(self, pid: int, rel: str, origins: dict[str, str]) -> None:
        """Move ``pid`` out of ``rel`` back to ``origins[h]`` in every hierarchy ``h`` where
        it sits in ``rel``. Raises :class:`CgroupError` unless, afterwards, it sits in ``rel``
        nowhere (and :class:`ProcessGone` if it exited)."""
        ...

    def kill_all(self, rel: str) -> bool:
        """Kill every process in ``rel`` and below at once (v2 ``cgroup.kill``). False where
        the kernel has no such file (v1, v2 before 5.14): the caller signals each member."""
        ...

    def contains(self, rel: str, pid: int) -> bool:
        """Whether ``pid`` is a member of ``rel``."""
        ...

    def remove(self, rel: str) -> None:
        """Remove ``rel`` and its child cgroups, deepest first; a missing cgroup is fine.

        Raises :class:`CgroupError` if one still has processes (the kernel says EBUSY).
        """
        ...


# --- cgroupspy extension ---------------------------------------------------------------------
# cgroupspy 0.2.x types are untyped (Any) for mypy, hence the ignores on the subclasses.


class _MaxIntegerFile(BaseFileInterface):  # type: ignore[misc]
    """An integer file where the kernel writes "max" for "no limit" (pids.max); None <-> max."""

    # Typed pass-throughs so mypy sees controller.max as int | None, not the descriptor.
    def __get__(self, instance: Any, owner: Any) -> int | None:
        value: int | None = super().__get__(instance, owner)
        return value

    def __set__(self, instance: Any, value: int | None) -> None:
        super().__set__(instance, value)

    def sanitize_get(self, value: str) -> int | None:
        return None if value.strip() == "max" else int(value)

    def sanitize_set(self, value: int | None) -> str:
        return "max" if value is None else str(int(value))


class PidsController(Controller):  # type: ignore[misc]
    """The v1 pids controller (Documentation/admin-guide/cgroup-v1/pids.rst), missing from
    cgroupspy: ``max`` (None = "max") and the read-only ``current``."""

    max = _MaxIntegerFile("pids.max")
    current = _MaxIntegerFile("pids.current", readonly=True)


class FreezerController(Controller):  # type: ignore[misc]
    """The v1 freezer controller, missing from cgroupspy: ``state`` is THAWED, FREEZING or
    FROZEN (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst)."""

    state = BaseFileInterface("freezer.state")


class RemedyNode(Node):  # type: ignore[misc]
    """A cgroupspy Node that also knows the pids and freezer controllers.

    cgroupspy picks a node's controller from the class-level ``CONTROLLERS`` map, keyed by the
    hierarchy's directory name. Its ``create_cgroup`` hard-codes the base ``Node`` class for
    children (which would lose these controllers), so remedy builds node chains itself.
    """

    CONTROLLERS: ClassVar[dict[bytes, Any]] = {
        **Node.CONTROLLERS,
        b"pids": PidsController,
        b"freezer": FreezerController,
    }


# --- helpers ---------------------------------------------------------------------------------


def _parts(rel: str) -> list[str]:
    """Validate ``rel`` and split it into path components ("/" -> [])."""
    if not rel.startswith("/"):
        raise CgroupError("cgroup path must be absolute within the hierarchy", cgroup=rel)
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts) or "\0" in rel:
        raise CgroupError("cgroup path must not contain '.', '..' or NUL", cgroup=rel)
    return parts


def _non_root_parts(rel: str, what: str) -> list[str]:
    parts = _parts(rel)
    if not parts:
        raise CgroupError(f"refusing to {what} the hierarchy root", cgroup=rel)
    return parts


def _holds(driver: CgroupDriver, rel: str, pid: int) -> bool:
    """Whether ``rel`` exists and lists ``pid``: a process is in exactly one cgroup per
    hierarchy, so this tells a true reading of /proc/pid/cgroup from a faked one."""
    try:
        return driver.contains(rel, pid)
    except CgroupError:
        return False


def _actionable(rel: str, pid: int) -> str:
    """``rel`` if this driver can act on it. Under a private cgroup namespace the kernel names
    cgroups above the reader's namespace root "/.."; those cannot be reached from here."""
    try:
        _parts(rel)
    except CgroupError as err:
        raise CgroupError(
            "cgroup path is outside this reader's view (a cgroup namespace?)", pid=pid, cgroup=rel
        ) from err
    return rel


def _error(err: OSError, what: str, rel: str) -> CgroupError:
    return CgroupError(f"{what}: {err.strerror}", cgroup=rel)


def _deepest_first(top: Path) -> Iterator[Path]:
    """``top`` and every directory below it, children before parents."""
    for dirpath, _dirnames, _files in os.walk(top, topdown=False):
        yield Path(dirpath)


def within(path: str, rel: str) -> bool:
    """Whether cgroup path ``path`` is ``rel`` or below it."""
    return path == rel or path.startswith(rel.rstrip("/") + "/")


def _file_pages(stat: Path, prefix: str = "") -> int:
    """Bytes of page cache (active + inactive file) memory.stat reports: reclaimable before
    any OOM kill. 0 when the file is not there (a fixture tree, an old kernel)."""
    try:
        text = stat.read_text()
    except FileNotFoundError:
        return 0
    wanted = {f"{prefix}active_file", f"{prefix}inactive_file"}
    total = 0
    for line in text.split("\n"):
        name, _, value = line.partition(" ")
        if name in wanted:
            total += int(value)
    return total


def _a_process(pid: int, rel: str) -> None:
    """cgroup.procs takes 0 as "the writer": a move of pid 0 would move the agent itself."""
    if pid <= 0:
        raise CgroupError(f"refusing to move pid {pid}: not a process", pid=pid, cgroup=rel)


def _subtree_pids(tops: list[Path], rel: str) -> list[int]:
    """Every pid in the cgroup.procs files under ``tops`` (missing tops skipped). Cgroups
    removed while we walk are skipped: their tasks were gone or moved."""
    found: set[int] = set()
    for top in tops:
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in os.walk(top):
            try:
                found.update(_read_pids(Path(dirpath) / "cgroup.procs"))
            except FileNotFoundError:
                continue
            except OSError as err:
                raise _error(err, f"cannot read {dirpath}/cgroup.procs", rel) from err
    return sorted(found)


def _read_pids(procs: Path) -> list[int]:
    return [int(x) for x in procs.read_text().split()]


def _has_processes(cgroup: Path) -> bool:
    """Whether ``cgroup`` itself (not below it) has member processes; no cgroup.procs (a
    directory just made in a fixture tree) has none."""
    try:
        return bool(_read_pids(cgroup / "cgroup.procs"))
    except FileNotFoundError:
        return False


def _reads(path: Path, line: str) -> Callable[[], bool]:
    """A check that ``path`` holds ``line`` as one of its lines."""
    return lambda: line in path.read_text().splitlines()


def _wait_for(done: Callable[[], bool], state: str, rel: str) -> None:
    """Poll ``done`` until it holds or :data:`_FREEZE_WAIT_S` passes (a freeze is asynchronous:
    v1 reports FREEZING, v2 "frozen 0" in cgroup.events, until every task has stopped)."""
    deadline = time.monotonic() + _FREEZE_WAIT_S
    try:
        while not done():
            if time.monotonic() > deadline:
                raise CgroupError(f"not {state} after {_FREEZE_WAIT_S:g} s", cgroup=rel)
            time.sleep(0.01)
    except OSError as err:
        raise _error(err, f"cannot check for {state}", rel) from err


def _rmdir_tree(top: Path, rel: str, rmdir: Callable[[Path], None]) -> None:
    if not top.is_dir():
        return
    for d in _deepest_first(top):
        try:
            rmdir(d)
        except FileNotFoundError:
            continue
        except OSError as err:
            # cgroup_destroy_locked(): EBUSY while the cgroup still has tasks or live children.
            if err.errno == errno.EBUSY:
                raise CgroupError(f"cannot remove {d}: still has processes", cgroup=rel) from err
            raise _error(err, f"cannot remove {d}", rel) from err


# --- v1 --------------------------------------------------------------------------------------


class CgroupV1Driver:
    """cgroup v1: a quarantine is one directory in the pids and one in the cpu hierarchy.

    Membership is read from the pids hierarchy, which is the one whose limit stops a fork
    storm; moves go to both so the CPU cap applies too.
    """

    version = 1
    _HIERARCHIES = ("pids", "cpu")

    def __init__(self, root: Path, procfs: ProcFS) -> None:
        """``root`` holds one directory per mounted v1 hierarchy (root/pids, root/cpu)."""
        self.root = root
        self._procfs = procfs

    def _dir(self, hierarchy: str, parts: list[str]) -> Path:
        return self.root.joinpath(hierarchy, *parts)

    def _node(self, hierarchy: str, parts: list[str]) -> RemedyNode:
        top = RemedyNode(os.fsencode(self.root))
        node = RemedyNode(hierarchy.encode(), parent=top)
        for part in parts:
            node = RemedyNode(os.fsencode(part), parent=node)
        return node

    def cgroup_of(self, pid: int) -> str:
        """The pids-hierarchy line of /proc/pid/cgroup."""
        path = self._procfs.cgroup(pid, "pids", is_member=lambda rel: _holds(self, rel, pid))
        if path is None:
            raise CgroupError("no pids hierarchy in /proc/pid/cgroup", pid=pid)
        return _actionable(path, pid)

    def display_path(self, rel: str) -> str:
        """root/pids/rel."""
        return str(self._dir("pids", _parts(rel)))

    def exists(self, rel: str) -> bool:
        """Whether the pids-hierarchy directory exists."""
        return self._dir("pids", _parts(rel)).is_dir()

    def create(self, rel: str, limits: Limits) -> None:
        """mkdir in the pids and cpu hierarchies, and in the hierarchy of every other limit that
        is set (memory, freezer, blkio); then write the limits (:meth:`apply`)."""
        parts = _non_root_parts(rel, "create")
        extra = [
            _V1_HIERARCHY[k] for k in limits.knobs() if _V1_HIERARCHY[k] not in self._HIERARCHIES
        ]
        for hierarchy in extra:
            self._require_hierarchy(hierarchy, rel)
        for hierarchy in (*self._HIERARCHIES, *extra):
            try:
                self._dir(hierarchy, parts).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise _error(err, f"cannot create in the {hierarchy} hierarchy", rel) from err
        self.apply(rel, limits)

    def apply(self, rel: str, limits: Limits) -> None:
        """Write the set limits; pids.max and the CFS quota through cgroupspy."""
        parts = _parts(rel)
        try:
            if limits.pids_max is not None:
                self._node("pids", parts).controller.max = limits.pids_max
            quota = limits.cpu_quota_us()
            if quota is not None:
                cpu = self._node("cpu", parts).controller
                # Period first: the kernel validates the quota against the current period.
                cpu.cfs_period_us = CPU_PERIOD_US
                cpu.cfs_quota_us = quota
        except OSError as err:
            # EINVAL on cfs_quota_us also means a parent's quota is smaller than this one
            # (tg_cfs_schedulable_down() in kernel/sched/core.c).
            raise _error(err, f"cannot write limits {limits}", rel) from err
        raw = limits.raw(self.version)
        rest: dict[str, str] = {
            k: raw[k] for k in ("memory_max", "memory_high", "io_weight", "frozen") if k in raw
        }
        self.write_knobs(rel, rest)

    def _require_hierarchy(self, hierarchy: str, rel: str) -> None:
        probe = {"blkio": "blkio.weight", "memory": "memory.limit_in_bytes"}
        top = self.root / hierarchy
        name = probe.get(hierarchy, "tasks")
        if not (top / name).exists():
            what = "io" if hierarchy == "blkio" else hierarchy
            # Since Linux 5.0 blkio.weight exists only with the BFQ scheduler (CFQ was removed).
            raise CgroupError(f"{what} controller not available (no {top / name})", cgroup=rel)

    def inode(self, rel: str) -> int:
        """os.stat of the pids-hierarchy directory."""
        try:
            return os.stat(self._dir("pids", _parts(rel))).st_ino
        except OSError as err:
            raise _error(err, "cannot stat cgroup", rel) from err

    def _knob_files(self, knob: str, parts: list[str]) -> tuple[Path, ...]:
        hierarchy = _V1_HIERARCHY[knob]
        d = self._dir(hierarchy, parts)
        if knob == "cpu_cores":
            return (d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
        name = {
            "pids_max": "pids.max",
            "memory_max": "memory.limit_in_bytes",
            "memory_high": "memory.soft_limit_in_bytes",
            "frozen": "freezer.state",
            "io_weight": "blkio.weight",
        }[knob]
        return (d / name,)

    def read_knobs(self, rel: str, knobs: Iterable[str]) -> dict[str, str]:
        """cpu_cores reads as "quota period"; the rest as the single file holds it."""
        parts = _parts(rel)
        values: dict[str, str] = {}
        for knob in knobs:
            self._require_hierarchy(_V1_HIERARCHY[knob], rel)
            try:
                values[knob] = " ".join(
                    f.read_text().strip() for f in self._knob_files(knob, parts)
                )
            except OSError as err:
                raise _error(err, f"cannot read {knob}", rel) from err
        return values

    def write_knobs(self, rel: str, values: dict[str, str]) -> None:
        """cpu_cores: the period first, then the quota; frozen: waits for FROZEN up to 1 s."""
        parts = _parts(rel)
        for knob, value in values.items():
            self._require_hierarchy(_V1_HIERARCHY[knob], rel)
            files = self._knob_files(knob, parts)
            if not files[0].parent.is_dir():
                raise CgroupError(
                    f"no such cgroup in the {_V1_HIERARCHY[knob]} hierarchy", cgroup=rel
                )
            try:
                if knob == "cpu_cores":
                    quota, period = value.split()
                    files[1].write_text(period)
                    files[0].write_text(quota)
                else:
                    files[0].write_text(value)
            except (OSError, ValueError) as err:
                why = err.strerror if isinstance(err, OSError) else str(err)
                if isinstance(err, OSError) and err.errno == errno.EBUSY and knob == "memory_max":
                    # mem_cgroup_resize_max(): usage stayed above the new limit after reclaim.
                    why = "usage is above it and could not be reclaimed"
                raise CgroupError(f"cannot write {knob}={value!r}: {why}", cgroup=rel) from err
            if knob == "frozen" and value == "FROZEN":
                _wait_for(_reads(files[0], "FROZEN"), "FROZEN", rel)

    def move(self, pid: int, rel: str) -> None:
        """Write ``pid`` to cgroup.procs in the pids and cpu hierarchies, and in the memory,
        freezer and blkio hierarchies where ``rel`` exists there (created for a limit)."""
        _a_process(pid, rel)
        parts = _parts(rel)
        extra = [
            h for h in ("memory", "freezer", "blkio") if parts and self._dir(h, parts).is_dir()
        ]
        for hierarchy in (*self._HIERARCHIES, *extra):
            try:
                # Not cgroupspy's ``procs`` setter: it joins pids with newlines in one write,
                # and cgroup.procs takes exactly one pid per write(2).
                self._node(hierarchy, parts).controller.set_property(b"cgroup.procs", pid)
            except ProcessLookupError as err:
                raise ProcessGone("exited before it could be moved", pid=pid, cgroup=rel) from err
            except OSError as err:
                raise CgroupError(
                    f"cannot move into the {hierarchy} hierarchy: {err.strerror}",
                    pid=pid,
                    cgroup=rel,
                ) from err

    def kill_all(self, rel: str) -> bool:
        """cgroup v1 has no cgroup.kill."""
        _parts(rel)
        return False

    def members(self, rel: str) -> list[int]:
        """cgroup.procs of the pids hierarchy; [] if the cgroup does not exist."""
        parts = _parts(rel)
        try:
            return [int(p) for p in self._node("pids", parts).controller.procs]
        except FileNotFoundError:
            return []
        except OSError as err:
            raise _error(err, "cannot read cgroup.procs", rel) from err

    def subtree_members(self, rel: str) -> list[int]:
        """cgroup.procs of ``rel`` and its descendants in every hierarchy, merged."""
        parts = _parts(rel)
        return _subtree_pids([self._dir(h, parts) for h in V1_HIERARCHIES], rel)

    def hierarchies_with(self, rel: str) -> list[str]:
        """Each mounted v1 hierarchy with a directory at ``rel``."""
        parts = _parts(rel)
        return [h for h in V1_HIERARCHIES if self._dir(h, parts).is_dir()]

    def members_anywhere(self, rel: str) -> list[int]:
        """cgroup.procs of ``rel`` in every hierarchy where it exists, merged."""
        parts = _parts(rel)
        found: set[int] = set()
        for hierarchy in V1_HIERARCHIES:
            procs = self._dir(hierarchy, parts) / "cgroup.procs"
            try:
                found.update(_read_pids(procs))
            except FileNotFoundError:
                continue
            except OSError as err:
                what = f"cannot read cgroup.procs in the {hierarchy} hierarchy"
                raise _error(err, what, rel) from err
        return sorted(found)

    def contains(self, rel: str, pid: int) -> bool:
        """Whether ``pid`` is in ``rel`` (pids hierarchy)."""
        return pid in self.members(rel)

    def origins(self, pid: int) -> dict[str, str]:
        """The pids, cpu, memory, freezer and blkio lines of /proc/pid/cgroup that are mounted
        here (each hierarchy has its own path: a service may sit in /system.slice/x.service
        for pids and in / for cpu)."""
        cgroups = self._procfs.cgroups(pid)
        return {h: cgroups[h] for h in V1_HIERARCHIES if h in cgroups and (self.root / h).is_dir()}

    def carried(self, wanted: Limits) -> tuple[str, ...]:
        """pids and cpu (a quarantine always moves there), and what ``wanted`` itself sets:
        memory and freezer are separate hierarchies here, so a step that sets no memory
        limit leaves the process in its own memory cgroup, under its limit exactly (a copy,
        computed from usage, could only be worse)."""
        moved = {*self._HIERARCHIES, *(_V1_HIERARCHY[k] for k in wanted.knobs())}
        return tuple(k for k in INHERITED if _V1_HIERARCHY[k] in moved)

    def inherited(self, origins: dict[str, str], knobs: Iterable[str] = INHERITED) -> Limits:
        """Each knob is read in its own hierarchy's origin and that path's ancestors."""
        result = Limits()
        for knob in knobs:
            hierarchy = _V1_HIERARCHY[knob]
            origin = origins.get(hierarchy)
            if origin is None or not (self.root / hierarchy).is_dir():
                continue
            parts = _parts(origin)
            for depth in range(len(parts), 0, -1):  # the root cgroup has no limits
                result = result.tightened(self._limit_at(knob, parts[:depth], origin))
        return result

    def _limit_at(self, knob: str, parts: list[str], rel: str) -> Limits:
        files = self._knob_files(knob, parts)
        try:
            raw = " ".join(f.read_text().strip() for f in files)
            value = _parse_raw(1, knob, raw)
            if value is not None and knob.startswith("memory_"):
                usage = int((files[0].parent / "memory.usage_in_bytes").read_text())
                cache = _file_pages(files[0].parent / "memory.stat", "total_")
                value = max(0, int(value) - max(0, usage - cache))
        except FileNotFoundError:
            return Limits()  # no such file at this level (e.g. freezer.state of the root)
        except (OSError, ValueError) as err:
            raise CgroupError(f"cannot read the {knob} it is under: {err}", cgroup=rel) from err
        return _one(knob, value)

    def restore(self, pid: int, rel: str, origins: dict[str, str]) -> None:
        """One write to the origin's cgroup.procs per hierarchy where ``pid`` is in ``rel``;
        every hierarchy is tried even when one fails, so as much as possible goes home."""
        _a_process(pid, rel)
        _parts(rel)
        failed: list[str] = []
        for hierarchy, where in self.origins(pid).items():
            if not within(where, rel):
                continue
            home = origins.get(hierarchy)
            if home is None:
                failed.append(f"no recorded origin in the {hierarchy} hierarchy")
                continue
            try:
                procs = self._dir(hierarchy, _parts(home)) / "cgroup.procs"
                procs.write_text(str(pid))
            except ProcessLookupError as err:
                raise ProcessGone("exited before it could be moved back", pid=pid) from err
            except OSError as err:
                failed.append(
                    f"cannot move back into {home} in the {hierarchy} hierarchy: {err.strerror}"
                )
            except CgroupError as err:  # a recorded path that is not one
                failed.append(str(err))
        stuck = [h for h, where in self.origins(pid).items() if within(where, rel)]
        if stuck:
            why = "; ".join(failed) or "the kernel kept it there"
            raise CgroupError(
                f"still in the quarantine in the {', '.join(stuck)} hierarchy: {why}", pid=pid
            )

    def remove(self, rel: str) -> None:
        """rmdir in every hierarchy remedy creates in, children first; nothing at all while a
        process is in it in any hierarchy (else the pids directory would go, and with it the
        only sign of a process still capped in another)."""
        parts = _non_root_parts(rel, "remove")
        if self.members_anywhere(rel):
            raise CgroupError("cannot remove: still has processes", cgroup=rel)
        for hierarchy in V1_HIERARCHIES:
            _rmdir_tree(self._dir(hierarchy, parts), rel, os.rmdir)


# --- v2 --------------------------------------------------------------------------------------


class CgroupV2Driver:
    """cgroup v2: one directory; controllers enabled through each ancestor's subtree_control."""

    version = 2

    def __init__(
        self, root: Path, procfs: ProcFS, *, rmdir: Callable[[Path], None] = os.rmdir
    ) -> None:
        """``rmdir`` is an override point: a fixture tree in a plain filesystem cannot drop its
        interface files on rmdir the way kernfs does, so tests pass one that does."""
        self.root = root
        self._procfs = procfs
        self._rmdir = rmdir

    def _dir(self, parts: list[str]) -> Path:
        return self.root.joinpath(*parts)

    def cgroup_of(self, pid: int) -> str:
        """The "0::" line of /proc/pid/cgroup."""
        path = self._procfs.cgroup(pid, "", is_member=lambda rel: _holds(self, rel, pid))
        if path is None:
            raise CgroupError("no cgroup v2 line in /proc/pid/cgroup", pid=pid)
        return _actionable(path, pid)

    def display_path(self, rel: str) -> str:
        """root/rel."""
        return str(self._dir(_parts(rel)))

    def exists(self, rel: str) -> bool:
        """Whether the directory exists."""
        return self._dir(_parts(rel)).is_dir()

    def _enable_controllers(self, cgroup: Path, rel: str, wanted: tuple[str, ...]) -> None:
        control = cgroup / "cgroup.subtree_control"
        try:
            enabled = set(control.read_text().split()) if control.exists() else set()
            missing = [c for c in wanted if c not in enabled]
            if missing and cgroup != self.root and _has_processes(cgroup):
                # The "no internal processes" rule (cgroup-v2.rst). The kernel refuses domain
                # controllers here (EBUSY) but takes threaded ones (pids, cpu) and so turns
                # this populated cgroup into a thread root: its domain children (systemd's
                # services below a slice, a container's) become invalid and the next write
                # fails with EOPNOTSUPP. Refuse before writing: never change a cgroup that is
                # not ours into something else.
                raise CgroupError(
                    f"cannot enable controllers in {control}: it has processes of its own"
                    " (cgroup v2 allows controllers for children only in a cgroup without)",
                    cgroup=rel,
                )
            if missing:
                control.write_text(" ".join(f"+{c}" for c in missing))
        except OSError as err:
            # EBUSY: as above, for domain controllers. ENOENT/EINVAL: the controller is not in
            # this cgroup's cgroup.controllers. EOPNOTSUPP: a thread subtree.
            raise _error(err, f"cannot enable controllers in {control}", rel) from err

    def create(self, rel: str, limits: Limits) -> None:
        """mkdir with parents, enabling +pids +cpu (and +memory, +io for those limits) in each
        ancestor's subtree_control that lacks them (from the root down), then :meth:`apply`."""
        parts = _non_root_parts(rel, "create")
        extra = [
            _V2_CONTROLLER_OF[k]
            for k in limits.knobs()
            if k in _V2_CONTROLLER_OF and _V2_CONTROLLER_OF[k] not in _V2_CONTROLLERS
        ]
        wanted = (*_V2_CONTROLLERS, *extra)
        for controller in extra:
            self._require_controller(controller, rel)
        # A limit file only appears in a child once its parent has enabled the controller, so
        # each level is enabled before the next is created.
        for depth in range(len(parts)):
            parent = self._dir(parts[:depth])
            self._enable_controllers(parent, rel, wanted)
            child = self._dir(parts[: depth + 1])
            try:
                child.mkdir(exist_ok=True)
            except OSError as err:
                raise _error(err, f"cannot create {child}", rel) from err
        self._write_limits(rel, limits)

    def _require_controller(self, controller: str, rel: str) -> None:
        listed = self.root / "cgroup.controllers"
        try:
            available = listed.read_text().split()
        except OSError as err:
            raise _error(err, f"cannot read {listed}", rel) from err
        if controller not in available:
            raise CgroupError(
                f"{controller} controller not available (not in {listed})", cgroup=rel
            )

    def apply(self, rel: str, limits: Limits) -> None:
        """Write pids.max, cpu.max, memory.high, io.weight and cgroup.freeze as set, first
        enabling each limit's controller in the ancestors that lack it (a cap in place on a
        cgroup systemd made: its cpu.max exists only once its parent enabled +cpu; writing the
        missing file is EACCES on cgroupfs, found by make vmtest)."""
        parts = _parts(rel)
        wanted = tuple(
            dict.fromkeys(_V2_CONTROLLER_OF[k] for k in limits.knobs() if k in _V2_CONTROLLER_OF)
        )
        if parts and wanted and self._dir(parts).is_dir():
            for controller in wanted:
                self._require_controller(controller, rel)
            for depth in range(len(parts)):
                self._enable_controllers(self._dir(parts[:depth]), rel, wanted)
        self._write_limits(rel, limits)

    def _write_limits(self, rel: str, limits: Limits) -> None:
        try:
            self.write_knobs(rel, limits.raw(self.version))
        except CgroupError as err:
            raise CgroupError(f"cannot write limits {limits}: {err}", cgroup=rel) from err

    def inode(self, rel: str) -> int:
        """os.stat of the cgroup directory."""
        try:
            return os.stat(self._dir(_parts(rel))).st_ino
        except OSError as err:
            raise _error(err, "cannot stat cgroup", rel) from err

    def read_knobs(self, rel: str, knobs: Iterable[str]) -> dict[str, str]:
        """The files' contents, stripped ("max 100000", "default 100", "0")."""
        d = self._dir(_parts(rel))
        values: dict[str, str] = {}
        for knob in knobs:
            if knob == "io_weight":
                self._require_controller("io", rel)
            try:
                values[knob] = (d / _V2_FILE[knob]).read_text().strip()
            except OSError as err:
                raise _error(err, f"cannot read {_V2_FILE[knob]}", rel) from err
        return values

    def write_knobs(self, rel: str, values: dict[str, str]) -> None:
        """Write each file; cgroup.freeze "1" waits up to 1 s for "frozen 1" in cgroup.events
        (where the file exists: a fixture tree has none)."""
        d = self._dir(_parts(rel))
        if not d.is_dir():
            raise CgroupError("no such cgroup", cgroup=rel)
        for knob, value in values.items():
            if knob == "io_weight":
                self._require_controller("io", rel)
            try:
                (d / _V2_FILE[knob]).write_text(value)
            except OSError as err:
                raise _error(err, f"cannot write {_V2_FILE[knob]}={value!r}", rel) from err
            events = d / "cgroup.events"
            if knob == "frozen" and value == "1" and events.exists():
                _wait_for(_reads(events, "frozen 1"), "frozen", rel)

    def move(self, pid: int, rel: str) -> None:
        """Write ``pid`` to rel/cgroup.procs."""
        _a_process(pid, rel)
        procs = self._dir(_parts(rel)) / "cgroup.procs"
        try:
            procs.write_text(str(pid))
        except ProcessLookupError as err:
            raise ProcessGone("exited before it could be moved", pid=pid, cgroup=rel) from err
        except OSError as err:
            raise CgroupError(f"cannot move: {err.strerror}", pid=pid, cgroup=rel) from err

    def kill_all(self, rel: str) -> bool:
        """Write 1 to cgroup.kill: the kernel kills the whole subtree, forks in flight
        included (Linux 5.14+)."""
        path = self._dir(_parts(rel)) / "cgroup.kill"
        if not path.exists():
            return False
        try:
            path.write_text("1")
        except OSError as err:
            raise _error(err, "cannot write cgroup.kill", rel) from err
        return True

    def members(self, rel: str) -> list[int]:
        """rel/cgroup.procs; [] if the cgroup does not exist."""
        try:
            return _read_pids(self._dir(_parts(rel)) / "cgroup.procs")
        except FileNotFoundError:
            return []
        except OSError as err:
            raise _error(err, "cannot read cgroup.procs", rel) from err

    def subtree_members(self, rel: str) -> list[int]:
        """cgroup.procs of ``rel`` and of every cgroup below it."""
        return _subtree_pids([self._dir(_parts(rel))], rel)

    def hierarchies_with(self, rel: str) -> list[str]:
        """The one hierarchy, where ``rel`` exists."""
        return [""] if self.exists(rel) else []

    def members_anywhere(self, rel: str) -> list[int]:
        """v2 has one hierarchy: :meth:`members`."""
        return self.members(rel)

    def contains(self, rel: str, pid: int) -> bool:
        """Whether ``pid`` is in ``rel``."""
        return pid in self.members(rel)

    def origins(self, pid: int) -> dict[str, str]:
        """{"": the "0::" line of /proc/pid/cgroup}."""
        cgroups = self._procfs.cgroups(pid)
        if "" not in cgroups:
            raise CgroupError("no cgroup v2 line in /proc/pid/cgroup", pid=pid)
        return {"": cgroups[""]}

    def carried(self, wanted: Limits) -> tuple[str, ...]:
        """One hierarchy: a move takes the process out from under every limit."""
        return INHERITED

    def inherited(self, origins: dict[str, str], knobs: Iterable[str] = INHERITED) -> Limits:
        """pids.max, cpu.max, memory.max/high (minus what memory.current holds beyond file
        pages) and cgroup.freeze of the origin and its ancestors; a file that is not there
        (controller off) caps nothing."""
        origin = origins.get("")
        if origin is None:
            return Limits()
        parts = _parts(origin)
        result = Limits()
        for depth in range(len(parts), 0, -1):  # the root cgroup has no limits
            d = self._dir(parts[:depth])
            for knob in knobs:
                result = result.tightened(self._limit_at(d, knob, origin))
        return result

    @staticmethod
    def _limit_at(d: Path, knob: str, rel: str) -> Limits:
        try:
            value = _parse_raw(2, knob, (d / _V2_FILE[knob]).read_text().strip())
            if value is not None and knob.startswith("memory_"):
                used = int((d / "memory.current").read_text()) - _file_pages(d / "memory.stat")
                value = max(0, int(value) - max(0, used))
        except FileNotFoundError:
            return Limits()
        except (OSError, ValueError) as err:
            raise CgroupError(f"cannot read the {knob} it is under: {err}", cgroup=rel) from err
        return _one(knob, value)

    def restore(self, pid: int, rel: str, origins: dict[str, str]) -> None:
        """Write ``pid`` to the origin's cgroup.procs if it is in ``rel``."""
        _a_process(pid, rel)
        _parts(rel)
        if not within(self.origins(pid)[""], rel):
            return
        home = origins.get("")
        if home is None:
            raise CgroupError("no recorded origin", pid=pid, cgroup=rel)
        self.move(pid, home)
        if within(self.origins(pid)[""], rel):
            raise CgroupError("still in the quarantine", pid=pid)

    def remove(self, rel: str) -> None:
        """rmdir ``rel`` and its children, deepest first."""
        parts = _non_root_parts(rel, "remove")
        _rmdir_tree(self._dir(parts), rel, self._rmdir)


# --- detection -------------------------------------------------------------------------------


def detect(root: Path = Path("/sys/fs/cgroup"), procfs: ProcFS | None = None) -> CgroupDriver:
    """The driver for the host's layout.

    Pure v2 when ``root`` itself is a cgroup2 mount (has cgroup.controllers). Otherwise v1 when
    root/pids and root/cpu are v1 hierarchies (they have a ``tasks`` file, which v2 never has).
    Hybrid hosts mount a cgroup2 at root/unified, usually with no controllers: remedy uses v1
    there, since pids and cpu can be bound to only one hierarchy at a time.
    """
    procfs = procfs or ProcFS()
    controllers_file = root / "cgroup.controllers"
    if controllers_file.exists():
        try:
            available = set(controllers_file.read_text().split())
        except OSError as err:
            raise CgroupError(f"cannot read {controllers_file}: {err.strerror}") from err
        missing = [c for c in _V2_CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 at {root} lacks controller(s) {', '.join(missing)} "
                f"in {controllers_file} (bound to a v1 hierarchy, or not built in)"
            )
        return CgroupV2Driver(root, procfs)
    needed = {"pids": "tasks", "cpu": "cpu.cfs_quota_us"}
    missing_v1 = [str(root / h / f) for h, f in needed.items() if not (root / h / f).exists()]
    if not missing_v1:
        return CgroupV1Driver(root, procfs)
    raise CgroupError(
        f"no usable cgroup hierarchy at {root}: {controllers_file} does not exist (not v2) "
        f"and v1 hierarchies are missing: {', '.join(missing_v1)}"
    )
