"""The /proc sampler: the catalogue's signals at lower fidelity, where BPF cannot run.

Every ``interval_s`` the sampler reads the process table (through psutil, or a fake in tests),
compares it with the previous table and turns the differences into the events the kernel would
have counted: new pids are forks, a new pid whose name differs from its parent's is a fork+exec,
a child seen once and gone by the next table is churn, and CPU time, anonymous RSS, descriptor
and connection counts are read as levels and differenced. Events go through the same fixed
windows as the kernel filter (a key's window opens at its first event, lasts ``window_s``, and
crosses at most once), so policies, the engine and the audit trail cannot tell the two sensors
apart except by ``SensorRecord.sampled``.

Fidelity limits, by signal (everything happening *between* two tables is invisible):

- ``fork_rate`` / ``fork_rate_cgroup``: only children still alive (or unreaped) at a sample are
  seen; a child that forks and exits between two samples is missed, so a storm of very
  short-lived children is undercounted. Threads (clone with CLONE_THREAD) are not counted; the
  kernel's sched_process_fork counts them. A child whose parent exited is reparented before we
  see it and is counted for its new parent.
- ``exec_rate`` / ``exec_rate_cgroup``: an exec is inferred from a changed name (at the child's
  first sighting, or on a known process between samples); an exec of a binary with the same
  name as the parent, several execs between samples, and execs by unseen children are missed,
  and a rename through prctl(PR_SET_NAME) looks like an exec.
- ``churn``: only children seen at one sample and gone (or zombies) by the next. Their lifetime
  is estimated from their age when last seen alive, a lower bound: a child can be counted that
  lived up to ``lifetime_s + interval_s``.
- ``cpu``: exact CPU time (``utime + stime``) differenced per sample, so it is the most faithful
  signal; a window's delta is attributed to the sample that read it.
- ``rss``: the level at each sample; a spike shorter than the interval is missed.
- ``open_rate``: the sum of *positive* changes of the descriptor count between samples, so an
  open followed by a close between two samples is invisible; ``fd_growth`` is the net change.
  A process's first sighting is its baseline: descriptors it opened before are not counted.
- ``connect_rate``: outbound TCP connections (SYN_SENT/ESTABLISHED, not accepted ones) and
  connected UDP sockets that are new since the last sample; connections opened and closed
  between samples (and failed connects) are missed. Reading them costs a walk of every
  process's descriptors, so it is done only when a policy uses the signal.

Tiers (issue 12) are the kernel's: each signal's plan has window classes (one window per key
and class) holding tiers, each with its own threshold, sustain, rule id and cgroup globs (matched
with fnmatchcase on the process's cgroup path, or the key cgroup's, like ``Facts.cgroup``). A key
emits at most one record per window and tier, naming the tier's rule and the plan's generation;
while the engine holds the key's incident, only tiers not yet emitted during it emit again.
``rss_growth`` is the anonymous RSS now minus at the window's first sample, in MiB.

Records name the process to act on: the parent for parent- and cgroup-keyed signals (the
children are usually gone by the time the engine looks), the process itself otherwise.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal, Protocol

import psutil

from remedy.clock import Clock, SystemClock
from remedy.compiler import SensorPlan, SignalPlan, Tier, WindowClass
from remedy.errors import ActionError, SensorError
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS, Mode, SignalCounters
from remedy.sensors.records import SensorRecord

__all__ = [
    "Needs",
    "ProcSampler",
    "ProcessSnapshot",
    "ProcessSource",
    "ProcessTable",
    "PsutilSource",
    "cgroup_key",
]

_MIB = 1 << 20
_CGROUP_SIGNALS = frozenset({"fork_rate_cgroup", "exec_rate_cgroup"})
_FD_SIGNALS = frozenset({"open_rate", "fd_growth"})
# Growth since the window's first sample (a level, differenced against the window's start).
# Named here as well as in the catalogue (the kernel half adds it there, id 10).
_GROWTH_SIGNALS = frozenset({"rss_growth"})
# TCP states of a connection this process initiated or is using; LISTEN and the closing states
# are not connects.
_CONNECTED_STATES = frozenset({psutil.CONN_SYN_SENT, psutil.CONN_ESTABLISHED})


@dataclass(frozen=True)
class Needs:
    """Which optional fields a sample must carry: only what the configured signals read."""

    cpu: bool = False
    rss: bool = False
    fds: bool = False
    connections: bool = False
    cgroup: bool = False

    @classmethod
    def for_signals(cls, names: Iterable[str], *, cgroup: bool = False) -> Needs:
        """The fields the given signals need; ``cgroup``: a tier matches on cgroups."""
        wanted = set(names)
        return cls(
            cpu="cpu" in wanted,
            rss=bool(wanted & {"rss", *_GROWTH_SIGNALS}),
            fds=bool(wanted & _FD_SIGNALS),
            connections="connect_rate" in wanted,
            cgroup=cgroup or bool(wanted & _CGROUP_SIGNALS),
        )

    @classmethod
    def for_plan(cls, plan: SensorPlan) -> Needs:
        scoped = any(t.cgroups for sp in plan.signals.values() for _, t in sp.tiers())
        return cls.for_signals(plan.signals, cgroup=scoped)


@dataclass(frozen=True)
class ProcessSnapshot:
    """One process at one sample. ``(pid, create_time)`` is its identity.

    Optional fields are None when not asked for (see :class:`Needs`) or unreadable.
    """

    pid: int
    ppid: int
    create_time: float  # seconds, in the clock of ProcessTable.taken_at
    comm: str
    zombie: bool = False
    cpu_s: float | None = None  # user + system CPU seconds of the process (not its children)
    rss_anon: int | None = None  # bytes of anonymous resident memory
    num_fds: int | None = None
    connections: frozenset[str] | None = None  # one string per outbound connection
    cgroup: str | None = None  # the cgroup path, e.g. "/system.slice/foo.service"


@dataclass(frozen=True)
class ProcessTable:
    """Every process on the host at one moment."""

    taken_at: float  # when the table was read, in the same clock as create_time
    processes: Sequence[ProcessSnapshot]


class ProcessSource(Protocol):
    """Where the sampler reads processes from: psutil on a host, a fake table in tests."""

    def sample(self, needs: Needs) -> ProcessTable:
        """Read the whole process table, with the optional fields ``needs`` asks for."""
        ...


class PsutilSource:
    """Reads the host's process table with psutil and ``/proc/<pid>/cgroup``."""

    def sample(self, needs: Needs) -> ProcessTable:
        """One pass over /proc; processes that exit mid-pass are skipped by psutil."""
        attrs = ["pid", "ppid", "create_time", "name", "status"]
        if needs.cpu:
            attrs.append("cpu_times")
        if needs.rss:
            attrs.append("memory_info")
        if needs.fds:
            attrs.append("num_fds")
        connections = _outbound_connections() if needs.connections else {}
        processes = []
        for proc in psutil.process_iter(attrs, ad_value=None):
            info = proc.info
            if info["create_time"] is None or info["ppid"] is None:
                continue  # unreadable stat: nothing to identify the process by
            times, mem = info.get("cpu_times"), info.get("memory_info")
            processes.append(
                ProcessSnapshot(
                    pid=int(info["pid"]),
                    ppid=int(info["ppid"]),
                    create_time=float(info["create_time"]),
                    comm=str(info["name"] or ""),
                    zombie=info["status"] == psutil.STATUS_ZOMBIE,
                    cpu_s=None if times is None else times.user + times.system,
                    # statm's resident minus shared is exactly the kernel's MM_ANONPAGES, i.e.
                    # /proc/pid/status RssAnon and what kmem:rss_stat reports for anon memory,
                    # without memory_full_info()'s slow walk of smaps.
                    rss_anon=None if mem is None else max(0, mem.rss - mem.shared),
                    num_fds=info.get("num_fds"),
                    connections=(
                        connections.get(int(info["pid"]), frozenset())
                        if needs.connections
                        else None
                    ),
                    cgroup=_cgroup_of(int(info["pid"])) if needs.cgroup else None,
                )
            )
        # psutil's create_time is boot_time() + start ticks, and boot_time() is /proc/stat's btime
        # in whole seconds; measuring "now" on that same scale keeps ages exact to a tick instead
        # of off by up to a second against time.time().
        taken_at = psutil.boot_time() + time.clock_gettime(time.CLOCK_BOOTTIME)
        return ProcessTable(taken_at=taken_at, processes=processes)


def _outbound_connections() -> dict[int, frozenset[str]]:
    """Outbound connections by pid: TCP connecting or established (not accepted), UDP connected."""
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return {}  # not root on a platform that refuses: the signal stays silent
    listening: dict[int, set[int]] = {}
    for c in conns:
        if c.pid is not None and c.status == psutil.CONN_LISTEN and c.laddr:
            listening.setdefault(c.pid, set()).add(c.laddr.port)
    out: dict[int, set[str]] = {}
    for c in conns:
        if c.pid is None or not c.laddr or not c.raddr:
            continue
        if c.status != psutil.CONN_NONE and c.status not in _CONNECTED_STATES:
            continue
        # An established socket on a port this process listens on was accepted, not connected.
        if c.laddr.port in listening.get(c.pid, ()):
            continue
        ident = f"{c.type}:{c.laddr.ip}:{c.laddr.port}>{c.raddr.ip}:{c.raddr.port}"
        out.setdefault(c.pid, set()).add(ident)
    return {pid: frozenset(s) for pid, s in out.items()}


_PROCFS = ProcFS()


def _cgroup_of(pid: int) -> str | None:
    """The unified (v2) cgroup path of a process, else its v1 pids/cpu hierarchy, else None.
    Parsed as the kernel writes it (remedy/proc.py): a cgroup name that fakes a line is never
    taken for another cgroup; an ambiguous file names no cgroup at all."""
    for key in ("", "pids", "cpu"):
        try:
            path = _PROCFS.cgroup(pid, key)
        except ActionError:
            return None  # gone, hidepid, or ambiguous: no cgroup signal for this process
        if path is not None:
            return path
    return None


def cgroup_key(path: str) -> int:
    """A stable 63-bit id for a cgroup path: the same across samples and restarts."""
    digest = hashlib.blake2b(path.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


# Windows are keyed by identity, not by bare number: (pid, create_time) for processes, so that a
# reused pid starts fresh; (cgroup key, 0.0) for cgroups. Records carry only the number.
_Key = tuple[int, float]
_UNKNOWN_START = -1.0  # create_time of a parent that is not in either table


@dataclass
class _Window:
    start: float
    carry: dict[int, int]  # per rule: crossing windows immediately before this one (`sustain`)
    value: float = 0.0
    base: float | None = None  # growth signals: the level at the window's first sample
    crossed: set[int] = field(default_factory=set)  # rules whose threshold this window reached
    streaks: dict[int, int] = field(default_factory=dict)  # carry + 1, per crossed rule


_ClassKey = tuple[str, int]  # (signal, window class index)


@dataclass
class _Counts:
    events_seen: int = 0
    records_emitted: int = 0
    windows_opened: int = 0


@dataclass(frozen=True)
class _Who:
    """The process a record names."""

    tgid: int
    ppid: int
    comm: str


@dataclass
class _Seen:
    """What the previous table said about one process identity."""

    snap: ProcessSnapshot
    last_alive: float | None  # taken_at of the last table that showed it alive (not a zombie)


@dataclass
class _Sample:
    """One table being compared with the previous one."""

    now: float  # Clock.monotonic() at the sample, for windows
    taken_at: float  # the table's clock, for ages
    current: dict[int, ProcessSnapshot]
    previous: dict[int, _Seen]
    boot_ns: int  # CLOCK_BOOTTIME stamped on every record of this sample
    records: list[SensorRecord] = field(default_factory=list)


class ProcSampler:
    """A :class:`~remedy.sensors.catalog.Sensor` that samples the process table.

    Not thread-safe: poll() belongs to the reader thread, like the kernel sensor's.
    """

    kind: Literal["kernel", "sampler"] = "sampler"

    def __init__(
        self,
        interval_s: float = 0.25,
        clock: Clock | None = None,
        source: ProcessSource | None = None,
        *,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._clock: Clock = clock or SystemClock()
        self._source: ProcessSource = source or PsutilSource()
        # Injected with the clock so that tests drive poll() with FakeClock.advance.
        self._sleep = sleep or time.sleep
        self._plan = SensorPlan({})
        self._windows: dict[_ClassKey, dict[_Key, _Window]] = {}
        # The identity behind a record's bare key (the last one that emitted), for measure/hold.
        self._emitters: dict[tuple[str, int, int], _Key] = {}
        # Open incidents (hold): the rules already emitted during each.
        self._held: dict[tuple[str, int, _Key], set[int]] = {}
        self._counts: dict[str, _Counts] = {}
        self._needs = Needs()
        self._callback: Callable[[SensorRecord], None] | None = None
        self._previous: dict[int, _Seen] | None = None
        self._next_due: float | None = None
        self._cgroup_paths: dict[int, str] = {}
        self._closed = False

    # --- the Sensor interface -------------------------------------------------------------

    def start(self, plan: SensorPlan) -> None:
        """Watch the plan's signals; the first table is read now, as the baseline."""
        if self._next_due is not None or self._closed:
            raise SensorError("the /proc sampler was already started")
        _validate(plan)
        self._plan = plan
        self._windows = {}
        self._counts = {name: _Counts() for name in plan.signals}
        self._needs = Needs.for_plan(plan)
        self._previous = self._remember(self._read(), None)
        self._next_due = self._clock.monotonic() + self.interval_s

    def configure(self, plan: SensorPlan) -> None:
        """New tiers, thresholds and generation, live. Open windows keep their start and value;
        a lowered threshold can make the next event of an open window cross. Like the kernel
        sensor, only the signals passed to start() can be watched."""
        unknown = sorted(set(plan.signals) - set(self._counts))
        if unknown:
            raise SensorError(
                f"signal(s) {', '.join(unknown)} were not started; the sampler, like the kernel "
                "sensor, only reconfigures signals passed to start()"
            )
        _validate(plan)
        self._plan = plan
        self._needs = Needs.for_plan(plan)

    def measure(self, record: SensorRecord) -> int | None:
        """The current value of the record's window (its rule's class, its key) in the
        signal's unit: 0 when that window has ended with no event since; None when the plan
        does not know the record's rule."""
        found = self._class_of(record)
        if found is None:
            return None
        cls = found
        ident = self._emitters.get((record.signal, cls.index, record.key))
        w = self._windows.get((record.signal, cls.index), {}).get(ident) if ident else None
        if w is None or self._clock.monotonic() - w.start >= cls.window_s:
            return 0
        return _in_unit(record.signal, w.value, cls.window_s)

    def hold(self, record: SensorRecord) -> None:
        """An incident is open for the record's key in its rule's class: tiers already emitted
        during it (this window's, and the record's) are not emitted again."""
        cls = self._class_of(record)
        ident = self._emitters.get((record.signal, cls.index, record.key)) if cls else None
        if cls is None or ident is None:
            return
        # The record's own tier only: holding another policy's tier (a lower one, or one that
        # crossed without its `for` met yet) would keep that policy from ever seeing the key.
        self._held.setdefault((record.signal, cls.index, ident), set()).add(record.rule)

    def unhold(self, record: SensorRecord) -> None:
        """The incident ended: the key's next crossing emits again."""
        cls = self._class_of(record)
        ident = self._emitters.get((record.signal, cls.index, record.key)) if cls else None
        if cls is not None and ident is not None:
            held = self._held.get((record.signal, cls.index, ident), set())
            held.discard(record.rule)  # another policy's hold of the key stays
            if not held:
                self._held.pop((record.signal, cls.index, ident), None)

    def _class_of(self, record: SensorRecord) -> WindowClass | None:
        found = self._plan.rule(record.rule) if record.rule else None
        if found is not None and found[0] == record.signal:
            return found[1]
        sp = self._plan.signals.get(record.signal)
        if sp is None or record.rule:
            return None  # a rule the running plan no longer has: no window to name
        return next((c for c in sp.classes if c.window_s == record.window_s), None)

    def open_ring_buffer(self, callback: Callable[[SensorRecord], None]) -> None:
        """Deliver records to ``callback`` from poll(); without one they are dropped."""
        self._callback = callback

    def poll(self, timeout_ms: int) -> None:
        """Sleep until the next sample is due (at most ``timeout_ms``), then sample and deliver."""
        if self._next_due is None or self._closed:
            raise SensorError("poll() needs a started, open /proc sampler")
        wait = self._next_due - self._clock.monotonic()
        budget = max(0, timeout_ms) / 1000
        if wait > budget:
            if budget > 0:
                self._sleep(budget)
            return
        if wait > 0:
            self._sleep(wait)
        records = self._take_sample()
        # Keep a steady cadence; after a stall, restart it from now instead of sampling in a
        # burst to catch up (the deltas already cover the gap).
        now = self._clock.monotonic()
        self._next_due += self.interval_s
        if self._next_due <= now:
            self._next_due = now + self.interval_s
        if self._callback is not None:
            for record in records:
                self._callback(record)

    def counters(self) -> Mapping[str, SignalCounters]:
        """Counters by signal; the sampler never loses records or refuses keys."""
        return {
            name: SignalCounters(
                events_seen=c.events_seen,
                records_emitted=c.records_emitted,
                windows_opened=c.windows_opened,
            )
            for name, c in self._counts.items()
        }

    def close(self) -> None:
        """Forget all state; the sampler holds no kernel or file resources between polls."""
        self._closed = True
        self._previous = None
        self._windows = {}
        self._emitters = {}
        self._held = {}
        self._cgroup_paths = {}

    # --- extras ---------------------------------------------------------------------------

    def cgroup_path(self, key: int) -> str | None:
        """The cgroup path behind a cgroup-keyed record's ``key``, as of the last sample."""
        return self._cgroup_paths.get(key)

    # --- sampling -------------------------------------------------------------------------

    def _read(self) -> ProcessTable:
        try:
            return self._source.sample(self._needs)
        except (OSError, psutil.Error) as err:
            raise SensorError(f"could not read the process table: {err}") from err

    def _remember(self, table: ProcessTable, previous: dict[int, _Seen] | None) -> dict[int, _Seen]:
        """The per-identity memory the next sample compares against."""
        seen: dict[int, _Seen] = {}
        for snap in table.processes:
            old = previous.get(snap.pid) if previous is not None else None
            last_alive = old.last_alive if old is not None and _same(old.snap, snap) else None
            if not snap.zombie:
                last_alive = table.taken_at
            seen[snap.pid] = _Seen(snap, last_alive)
        if self._needs.cgroup:
            self._cgroup_paths = {
                cgroup_key(s.cgroup): s.cgroup for s in table.processes if s.cgroup is not None
            }
        return seen

    def _take_sample(self) -> list[SensorRecord]:
        assert self._previous is not None  # start() took the baseline
        table = self._read()
        s = _Sample(
            now=self._clock.monotonic(),
            taken_at=table.taken_at,
            current={p.pid: p for p in table.processes},
            previous=self._previous,
            # Taken after the table is read, so every process a record names started before it
            # (the identifier rejects a pid whose process started after the crossing).
            boot_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME),
        )
        self._births(s)
        self._exits(s)
        self._levels(s)
        self._prune(s.now)
        self._previous = self._remember(table, self._previous)
        return s.records

    def _births(self, s: _Sample) -> None:
        """fork_rate(_cgroup), exec_rate(_cgroup): new identities, and renamed known ones."""
        born = [p for p in s.current.values() if not _known(s, p)]
        # Oldest first, so the child that tips a window is the one the kernel would have seen.
        born.sort(key=lambda p: (p.create_time, p.pid))
        for child in born:
            parent = _parent(s, child)
            who = _who(parent, child.ppid)
            pkey = _pkey(parent, child.ppid)
            # A child is born in its parent's cgroup: the forker's cgroup decides cgroup tiers.
            self._observe(s, "fork_rate", pkey, 1.0, who, cgroup=child.cgroup)
            if child.cgroup is not None:
                ckey = (cgroup_key(child.cgroup), 0.0)
                self._observe(s, "fork_rate_cgroup", ckey, 1.0, who, cgroup=child.cgroup)
            if parent is not None and child.comm != parent.comm:
                self._exec(s, child, pkey, who)
        for snap in s.current.values():
            old = s.previous.get(snap.pid)
            if old is not None and _same(old.snap, snap) and old.snap.comm != snap.comm:
                parent = _parent(s, snap)
                self._exec(s, snap, _pkey(parent, snap.ppid), _who(parent, snap.ppid))

    def _exec(self, s: _Sample, proc: ProcessSnapshot, pkey: _Key, who: _Who) -> None:
        self._observe(s, "exec_rate", pkey, 1.0, who, cgroup=proc.cgroup)
        if proc.cgroup is not None:
            ckey = (cgroup_key(proc.cgroup), 0.0)
            self._observe(s, "exec_rate_cgroup", ckey, 1.0, who, cgroup=proc.cgroup)

    def _exits(self, s: _Sample) -> None:
        """churn: children that exited since the last table, young when last seen alive."""
        churn = self._plan.signals.get("churn")
        if churn is None:
            return
        exited: list[tuple[ProcessSnapshot, float]] = []
        for old in s.previous.values():
            cur = s.current.get(old.snap.pid)
            gone = cur is None or not _same(old.snap, cur) or (cur.zombie and not old.snap.zombie)
            if gone and old.last_alive is not None:
                exited.append((old.snap, old.last_alive - old.snap.create_time))
        for snap in s.current.values():
            if snap.zombie and not _known(s, snap):
                # Born and exited between two tables: its age now bounds its lifetime from above.
                exited.append((snap, s.taken_at - snap.create_time))
        exited.sort(key=lambda e: (e[0].create_time, e[0].pid))
        for child, age in exited:
            if age < churn.lifetime_s:
                parent = _parent(s, child)
                pkey, who = _pkey(parent, child.ppid), _who(parent, child.ppid)
                self._observe(s, "churn", pkey, 1.0, who, cgroup=child.cgroup)

    def _levels(self, s: _Sample) -> None:
        """cpu, rss, open_rate, fd_growth, connect_rate: per-process levels and their deltas."""
        for snap in s.current.values():
            if snap.zombie:
                continue  # its memory, descriptors and sockets are already released
            old = s.previous.get(snap.pid)
            before = old.snap if old is not None and _same(old.snap, snap) else None
            key = (snap.pid, snap.create_time)
            who = _Who(snap.pid, snap.ppid, snap.comm)
            if snap.cpu_s is not None:
                # A process born since the last table used all of its CPU time since then.
                base = 0.0 if before is None else before.cpu_s
                if base is not None and snap.cpu_s > base:
                    self._observe(s, "cpu", key, snap.cpu_s - base, who, cgroup=snap.cgroup)
            if snap.rss_anon is not None:
                mib = float(snap.rss_anon // _MIB)
                self._observe(s, "rss", key, mib, who, cgroup=snap.cgroup)
                self._observe(s, "rss_growth", key, mib, who, cgroup=snap.cgroup)
            if snap.num_fds is not None and before is not None and before.num_fds is not None:
                delta = snap.num_fds - before.num_fds
                if delta > 0:
                    self._observe(s, "open_rate", key, float(delta), who, cgroup=snap.cgroup)
                if delta != 0:
                    self._observe(s, "fd_growth", key, float(delta), who, cgroup=snap.cgroup)
            if snap.connections is not None:
                prior = frozenset[str]() if before is None else before.connections
                if prior is not None and (new := len(snap.connections - prior)):
                    self._observe(s, "connect_rate", key, float(new), who, cgroup=snap.cgroup)

    def _observe(
        self, s: _Sample, name: str, key: _Key, amount: float, who: _Who, *, cgroup: str | None
    ) -> None:
        """Feed one event into ``key``'s window of every class with a tier that applies to
        ``cgroup``; emit a record the first time the window reaches a tier."""
        sp = self._plan.signals.get(name)
        if sp is None:
            return
        counts = self._counts[name]
        counts.events_seen += 1
        for cls in sp.classes:
            tiers = [t for t in cls.tiers if _applies(t, cgroup)]
            if tiers:
                self._count(s, sp, cls, tiers=tiers, key=key, amount=amount, who=who)

    def _count(
        self,
        s: _Sample,
        sp: SignalPlan,
        cls: WindowClass,
        *,
        tiers: list[Tier],
        key: _Key,
        amount: float,
        who: _Who,
    ) -> None:
        name, counts = sp.signal, self._counts[sp.signal]
        windows = self._windows.setdefault((name, cls.index), {})
        w = windows.get(key)
        if w is None or s.now - w.start >= cls.window_s:
            # Windows are consecutive when the new one opens within a window of the old one's end.
            adjacent = w is not None and w.crossed and s.now - w.start < 2 * cls.window_s
            w = _Window(start=s.now, carry=dict(w.streaks) if adjacent and w is not None else {})
            windows[key] = w
            counts.windows_opened += 1
        if name in _GROWTH_SIGNALS:
            if w.base is None:
                w.base = amount
            w.value = amount - w.base
        elif SIGNALS[name].mode is Mode.LEVEL:
            w.value = amount
        else:
            w.value += amount
        value = _in_unit(name, w.value, cls.window_s)
        held = self._held.get((name, cls.index, key))
        for tier in tiers:  # ascending threshold: a jump past two tiers emits for each
            if tier.rule in w.crossed or value < tier.threshold:
                continue  # once per window and tier, like the kernel
            w.crossed.add(tier.rule)
            w.streaks[tier.rule] = w.carry.get(tier.rule, 0) + 1
            if w.streaks[tier.rule] < tier.sustain:
                continue
            if held is not None and tier.rule in held:
                continue  # the engine follows this incident: it re-measures instead
            counts.records_emitted += 1
            self._emitters[(name, cls.index, key[0])] = key
            s.records.append(
                SensorRecord(
                    signal=name,
                    tgid=who.tgid,
                    pid=who.tgid,
                    ppid=who.ppid,
                    comm=who.comm,
                    cgroup_id=0,
                    count=value,
                    window_s=cls.window_s,
                    elapsed_s=s.now - w.start,
                    ts_boot_ns=s.boot_ns,
                    key=key[0],
                    sampled=True,
                    rule=tier.rule,
                    generation=self._plan.generation,
                )
            )

    def _prune(self, now: float) -> None:
        """Drop windows that can no longer count or carry a streak: memory stays bounded by the
        number of keys active in the last two windows (and the incidents the engine holds)."""
        live: set[tuple[str, int, _Key]] = set()
        for (name, index), windows in self._windows.items():
            sp = self._plan.signals.get(name)
            window_s = next((c.window_s for c in sp.classes if c.index == index), 0.0) if sp else 0
            for key in [k for k, w in windows.items() if now - w.start >= 2 * window_s]:
                del windows[key]
            live.update((name, index, k) for k in windows)
        live.update(self._held)
        self._emitters = {
            ek: ident for ek, ident in self._emitters.items() if (ek[0], ek[1], ident) in live
        }


def _applies(tier: Tier, cgroup: str | None) -> bool:
    """Everywhere, or the event's cgroup (the key cgroup for cgroup-keyed signals) matches one
    of the tier's globs, as ``Facts.cgroup`` is matched: fnmatchcase on the path."""
    if tier.everywhere:
        return True
    return cgroup is not None and any(fnmatchcase(cgroup, g) for g in tier.cgroups)


def _validate(plan: SensorPlan) -> None:
    for name, sp in plan.signals.items():
        if name not in SIGNALS and name not in _GROWTH_SIGNALS:
            raise SensorError(f"unknown signal {name!r}; known: {', '.join(SIGNALS)}")
        for cls, t in sp.tiers():
            if cls.window_s <= 0 or t.threshold < 1 or t.sustain < 1 or sp.lifetime_s <= 0:
                raise SensorError(
                    f"signal {name!r} rule {t.rule}: window_s > 0, threshold >= 1, sustain >= 1 "
                    f"and lifetime_s > 0 are required, got {cls.window_s}, {t}"
                )


def _in_unit(name: str, value: float, window_s: float) -> int:
    """A window's raw value in the unit its threshold counts (Signal.unit)."""
    if name == "cpu":
        return int(value * 100 / window_s)  # CPU seconds -> percent of one core
    return int(value)


def _same(a: ProcessSnapshot, b: ProcessSnapshot) -> bool:
    return a.pid == b.pid and a.create_time == b.create_time


def _known(s: _Sample, snap: ProcessSnapshot) -> bool:
    """Whether the previous table held this very process (not just its pid)."""
    old = s.previous.get(snap.pid)
    return old is not None and _same(old.snap, snap)


def _parent(s: _Sample, child: ProcessSnapshot) -> ProcessSnapshot | None:
    """The child's parent from either table; a parent that started after the child is a process
    that reused the parent's pid, and does not count."""
    for candidate in (s.current.get(child.ppid), _snap(s.previous.get(child.ppid))):
        if candidate is not None and candidate.create_time <= child.create_time:
            return candidate
    return None


def _snap(seen: _Seen | None) -> ProcessSnapshot | None:
    return None if seen is None else seen.snap


def _pkey(parent: ProcessSnapshot | None, ppid: int) -> _Key:
    return (ppid, _UNKNOWN_START) if parent is None else (parent.pid, parent.create_time)


def _who(parent: ProcessSnapshot | None, ppid: int) -> _Who:
    return _Who(ppid, 0, "") if parent is None else _Who(parent.pid, parent.ppid, parent.comm)
