"""Pressure signals (PSI): the kernel's stall accounting, watched through its own triggers.

For each rule the sensor writes ``some|full <stall us> <window us>`` (NUL-terminated) to a
``*.pressure`` file opened O_RDWR|O_NONBLOCK, and waits for POLLPRI on it: the kernel filters,
user space wakes only on a crossing (Documentation/accounting/psi.rst, "Userspace monitors").
POLLERR on a cgroup's trigger means the cgroup was removed. One thread polls every trigger
through one epoll set; cgroups matching a rule's globs are followed by rescanning the cgroup2
tree on a timer and whenever a trigger reports its cgroup gone.

The offender is the cgroup (a tgid-0 record keyed by the cgroup2 directory's inode), or with
``offender: heaviest`` the process in it that uses most of the pressured resource, pinned by a
pidfd and never a protected one (:class:`PsiIdentifier`). A host rule's offender is the host:
notify-only, enforced when policies load (docs/psi.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from remedy.actions.process import ProcessHandle
from remedy.engine.offender import Member, Subject
from remedy.errors import ActionError, IdentityUnverified, ProcessGone, RemedyError, SensorError
from remedy.proc import ProcessInfo, ProcFS
from remedy.sensors.catalog import SignalCounters
from remedy.sensors.records import SensorRecord

if TYPE_CHECKING:
    from remedy.actions.cgroups import CgroupDriver
    from remedy.compiler import SensorPlan
    from remedy.engine.engine import Identifier
    from remedy.policy.model import PolicySet

__all__ = [
    "CGROUP2_ROOT",
    "HOST_PRESSURE",
    "MAX_TRIGGERS",
    "PRESSURE_SIGNALS",
    "WINDOW_MAX_US",
    "WINDOW_MIN_US",
    "PsiCounters",
    "PsiIdentifier",
    "PsiReading",
    "PsiRule",
    "PsiSensor",
    "heaviest",
    "parse_pressure",
    "psi_rules",
]

log = logging.getLogger(__name__)

#: Signal name → the resource of its pressure file (``<resource>.pressure``).
PRESSURE_SIGNALS: Mapping[str, str] = {
    "cpu_pressure": "cpu",
    "memory_pressure": "memory",
    "io_pressure": "io",
}
# psi.rst: "The window size must be at least 500ms and at most 10s" (kernel/sched/psi.c,
# WINDOW_MIN_US / WINDOW_MAX_US); a larger or smaller one is EINVAL at write().
WINDOW_MIN_US = 500_000
WINDOW_MAX_US = 10_000_000
#: Triggers armed at once, over every rule and cgroup: each holds a descriptor and a kernel
#: poll worker, so a glob matching thousands of cgroups must not arm thousands.
MAX_TRIGGERS = 256
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")
HOST_PRESSURE = Path("/proc/pressure")

Stall = Literal["some", "full"]


@dataclass(frozen=True)
class PsiReading:
    """One line pair of a pressure file: the smoothed share of time stalled (percent) over the
    last 10 s and the total stall time (us) since boot, for ``some`` and ``full``."""

    some_avg10: float
    some_total: int
    full_avg10: float = 0.0
    full_total: int = 0

    def avg10(self, stall: Stall) -> float:
        return self.some_avg10 if stall == "some" else self.full_avg10


def parse_pressure(text: str) -> PsiReading:
    """Parse ``some avg10=… avg60=… avg300=… total=…`` (and the ``full`` line, absent for the
    host's cpu file on kernels before 5.13). ValueError on anything else."""
    lines: dict[str, dict[str, str]] = {}
    for line in text.split("\n"):
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            raise ValueError(f"unexpected pressure line {line!r}")
        lines[kind] = dict(item.split("=", 1) for item in rest.split() if "=" in item)
    if "some" not in lines:
        raise ValueError("no 'some' line in the pressure file")

    def values(kind: str) -> tuple[float, int]:
        fields = lines.get(kind)
        if fields is None:
            return 0.0, 0
        return float(fields["avg10"]), int(fields["total"])

    try:
        some, full = values("some"), values("full")
    except (KeyError, ValueError) as err:
        raise ValueError(f"malformed pressure file: {err}") from None
    return PsiReading(some[0], some[1], full[0], full[1])


@dataclass(frozen=True)
class PsiRule:
    """One pressure policy as the sensor arms it: a trigger per matching cgroup (or one for
    the host) that fires when ``stall`` time reaches ``stall_us`` within ``window_us``."""

    rule: int  # the policy's rule id (remedy.compiler): records carry it
    policy: str
    signal: str  # one of PRESSURE_SIGNALS
    stall: Stall
    stall_us: int
    window_us: int
    host: bool = False  # the host's /proc/pressure file instead of cgroups
    cgroups: tuple[str, ...] = ()  # fnmatch globs on cgroup2 paths ("/a/b")
    heaviest: bool = False  # the offender is the heaviest process of the cgroup
    notify_only: bool = False  # every step of its playbook only notifies
    generation: int = 0  # of the plan that numbered ``rule``

    def __post_init__(self) -> None:
        if self.signal not in PRESSURE_SIGNALS:
            raise ValueError(f"{self.signal} is no pressure signal")
        if not WINDOW_MIN_US <= self.window_us <= WINDOW_MAX_US:
            raise ValueError(f"PSI window {self.window_us} us is outside 500 ms..10 s")
        if not 0 < self.stall_us <= self.window_us:
            raise ValueError(f"stall {self.stall_us} us must be within the window")

    @property
    def resource(self) -> str:
        return PRESSURE_SIGNALS[self.signal]

    @property
    def threshold_pct(self) -> int:
        return round(self.stall_us * 100 / self.window_us)

    def trigger(self) -> bytes:
        """What is written to the pressure file; psi.rst: the NUL terminates the string."""
        return f"{self.stall} {self.stall_us} {self.window_us}\0".encode()

    def wants(self, rel: str) -> bool:
        """Whether this cgroup rule arms a trigger on ``rel`` (never the root: not a cgroup
        anyone owns, and the host rule's business)."""
        return not self.host and rel != "/" and any(fnmatchcase(rel, g) for g in self.cgroups)


def psi_rules(policies: PolicySet, plan: SensorPlan | None = None) -> tuple[PsiRule, ...]:
    """The rules of every pressure policy, numbered as ``plan`` (compiled from ``policies``;
    default: compiled here) numbers them, with its generation: records route to their policy
    by these, as kernel records do. A policy the plan lacks gets rule 0."""
    if plan is None:
        from remedy.compiler import compile_plan  # noqa: PLC0415 (the compiler imports policies)

        plan = compile_plan(policies)
    rule_ids = {tier.policy: tier.rule for sp in plan.signals.values() for _, tier in sp.tiers()}
    rules: list[PsiRule] = []
    for p in policies.policies:
        spec = p.pressure
        if p.signal not in PRESSURE_SIGNALS or spec is None:
            continue
        window_us = round(p.window_s * 1_000_000)
        steps = policies.playbooks[p.playbook].steps if p.playbook in policies.playbooks else ()
        rules.append(
            PsiRule(
                rule=rule_ids.get(p.name, 0),
                policy=p.name,
                signal=p.signal,
                stall="full" if spec.stall == "full" else "some",
                stall_us=max(1, window_us * p.threshold // 100),
                window_us=window_us,
                host=spec.scope == "host",
                cgroups=p.match.cgroups,
                heaviest=spec.offender == "heaviest",
                notify_only=all(s.action == "notify" for s in steps),
                generation=plan.generation,
            )
        )
    return tuple(rules)


@dataclass
class PsiCounters:
    """What the PSI sensor did; shown in status beside the kernel sensor's counters."""

    triggers_armed: int = 0  # now
    triggers_refused: int = 0  # not armed: MAX_TRIGGERS were armed already
    triggers_failed: int = 0  # the kernel refused one (open or write failed)
    cgroups_gone: int = 0  # POLLERR, or gone at a rescan: the trigger was dropped
    events_seen: int = 0  # POLLPRI wake-ups: every one a crossing the kernel saw
    records_emitted: int = 0
    records_dropped: int = 0  # the record queue was full
    rescans: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Trigger:
    rule: PsiRule
    rel: str  # "/" for the host
    path: Path
    fd: int
    inode: int  # of the cgroup2 directory (0 for the host)


# include/uapi/linux/capability.h
_CAP_SYS_RESOURCE = 24


def has_cap_sys_resource(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process may arm any PSI window: without CAP_SYS_RESOURCE the kernel takes
    only windows that are a multiple of 2 s (kernel/sched/psi.c, psi_trigger_create)."""
    try:
        for line in status.read_text().split("\n"):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _why_refused(rule: PsiRule, err: OSError) -> str:
    if err.errno == errno.EINVAL and rule.window_us % 2_000_000 and not has_cap_sys_resource():
        return (
            f" (window {rule.window_us / 1e6:g} s: without CAP_SYS_RESOURCE the kernel takes "
            "only windows that are a multiple of 2 s)"
        )
    return ""


def _boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class PsiSensor:
    """Arms PSI triggers for ``rules`` and delivers a :class:`SensorRecord` per crossing to
    ``callback`` (from its own thread, as the kernel sensor's reader does). Roots and clocks are
    injected for tests."""

    kind = "psi"

    def __init__(
        self,
        rules: Iterable[PsiRule],
        callback: Callable[[SensorRecord], None],
        *,
        cgroup2_root: Path = CGROUP2_ROOT,
        host_root: Path = HOST_PRESSURE,
        max_triggers: int = MAX_TRIGGERS,
        rescan_s: float = 2.0,
        boot_ns: Callable[[], int] = _boot_ns,
    ) -> None:
        self.rules = tuple(rules)
        self._callback = callback
        self._cgroup2 = cgroup2_root
        self._host = host_root
        self._max = max_triggers
        self._rescan_s = rescan_s
        self._boot_ns = boot_ns
        self._stats = PsiCounters()
        self._lock = threading.Lock()  # counters are read from the worker thread
        self._triggers: dict[int, _Trigger] = {}  # by fd
        self._by_key: dict[tuple[int, str], _Trigger] = {}  # (rule index, rel)
        self._epoll: select.epoll | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.last_refusal = ""  # why the kernel refused the last trigger, for messages
        self._events: dict[str, int] = {}  # per signal, for signal_counters()
        self._emitted: dict[str, int] = {}
        self._refused: dict[str, int] = {}

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Arm every trigger and start the poll thread. SensorError when a host trigger cannot
        be armed (no PSI in this kernel: psi=0, or CONFIG_PSI off)."""
        self._epoll = select.epoll()
        try:
            for index, rule in enumerate(self.rules):
                if rule.host:
                    self._arm_host(index, rule)
            self.rescan()
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._run, name="remedy-psi", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and close every trigger (the kernel drops a trigger with its fd)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            for trigger in list(self._triggers.values()):
                self._drop(trigger)
            if self._epoll is not None:
                self._epoll.close()
                self._epoll = None

    def reconfigure(self, rules: Iterable[PsiRule]) -> None:
        """Swap the rules (a reload): every trigger is dropped and armed again for the new
        ones. SensorError, with nothing armed for the host, when a host trigger is refused."""
        with self._lock:
            for trigger in list(self._triggers.values()):
                self._drop(trigger)
            self.rules = tuple(rules)
        for index, rule in enumerate(self.rules):
            if rule.host:
                self._arm_host(index, rule)
        self.rescan()

    def signal_counters(self) -> dict[str, SignalCounters]:
        """Per signal, in the kernel sensor's shape, for status: wake-ups are the events seen,
        triggers armed the windows open, refused and failed triggers the keys not counted."""
        with self._lock:
            armed: dict[str, int] = {}
            for trigger in self._triggers.values():
                armed[trigger.rule.signal] = armed.get(trigger.rule.signal, 0) + 1
            return {
                signal: SignalCounters(
                    events_seen=self._events.get(signal, 0),
                    records_emitted=self._emitted.get(signal, 0),
                    windows_opened=armed.get(signal, 0),
                    key_init_failed=self._refused.get(signal, 0),
                )
                for signal in dict.fromkeys(r.signal for r in self.rules)
            }

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def counters(self) -> PsiCounters:
        with self._lock:
            return replace(self._stats, triggers_armed=len(self._triggers))

    def armed(self) -> list[tuple[str, str]]:
        """(policy, cgroup) of every trigger armed now; the host is "/"."""
        with self._lock:
            return sorted((t.rule.policy, t.rel) for t in self._triggers.values())

    # -- following cgroups ---------------------------------------------------------------------

    def rescan(self) -> None:
        """Arm triggers on cgroups that appeared and match, drop those of cgroups gone. Rules
        are read under the lock: a rescan racing a reload never arms for rules replaced."""
        present = dict(self._walk()) if any(not r.host for r in self.rules) else {}
        with self._lock:
            self._stats.rescans += 1
            rules = self.rules
            for (index, rel), trigger in list(self._by_key.items()):
                if index >= len(rules) or rules[index] is not trigger.rule:
                    self._drop(trigger)  # armed for a rule a reload replaced
                elif not trigger.rule.host and present.get(rel) != trigger.inode:
                    self._stats.cgroups_gone += 1
                    self._drop(trigger)
            for rel, inode in present.items():
                for index, rule in enumerate(rules):
                    if (index, rel) not in self._by_key and rule.wants(rel):
                        self._arm(index, rule, rel, self._cgroup2 / rel.lstrip("/"), inode)

    def _walk(self) -> Iterator[tuple[str, int]]:
        """(path, inode) of every cgroup under the cgroup2 root."""
        for dirpath, _dirs, _files in os.walk(self._cgroup2):
            rel = "/" + Path(dirpath).relative_to(self._cgroup2).as_posix()
            rel = "/" if rel == "/." else rel
            with contextlib.suppress(OSError):  # removed while walking
                yield rel, os.stat(dirpath).st_ino

    # -- triggers ------------------------------------------------------------------------------

    def _arm_host(self, index: int, rule: PsiRule) -> None:
        path = self._host / rule.resource
        with self._lock:
            if not self._arm(index, rule, "/", path, 0):
                raise SensorError(
                    f"cannot arm the host PSI trigger for policy {rule.policy}: "
                    f"{self.last_refusal or path} (is PSI enabled? psi=1, CONFIG_PSI)"
                )

    def _arm(self, index: int, rule: PsiRule, rel: str, directory: Path, inode: int) -> bool:
        """Open, write the trigger, add to epoll. Called with the lock held."""
        if len(self._triggers) >= self._max:
            self._stats.triggers_refused += 1
            self._refused[rule.signal] = self._refused.get(rule.signal, 0) + 1
            return False
        path = directory if rule.host else directory / f"{rule.resource}.pressure"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            self._stats.triggers_failed += 1
            self._refused[rule.signal] = self._refused.get(rule.signal, 0) + 1
            log.warning("PSI: cannot open %s for %s: %s", path, rule.policy, err.strerror)
            return False
        try:
            os.write(fd, rule.trigger())
            assert self._epoll is not None
            self._epoll.register(fd, select.EPOLLPRI | select.EPOLLERR)
        except OSError as err:
            os.close(fd)
            self._stats.triggers_failed += 1
            self._refused[rule.signal] = self._refused.get(rule.signal, 0) + 1
            self.last_refusal = f"{path}: {err.strerror}{_why_refused(rule, err)}"
            log.warning("PSI: trigger %r refused by %s", rule.trigger(), self.last_refusal)
            return False
        trigger = _Trigger(rule, rel, path, fd, inode)
        self._triggers[fd] = trigger
        self._by_key[(index, rel)] = trigger
        return True

    def _drop(self, trigger: _Trigger) -> None:
        """Called with the lock held."""
        self._triggers.pop(trigger.fd, None)
        for key, value in list(self._by_key.items()):
            if value is trigger:
                del self._by_key[key]
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(trigger.fd)
        with contextlib.suppress(OSError):
            os.close(trigger.fd)

    # -- the poll thread -----------------------------------------------------------------------

    def _run(self) -> None:
        next_scan = time.monotonic() + self._rescan_s
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min(0.5, next_scan - time.monotonic()))
                epoll = self._epoll
                if epoll is None:
                    return
                events = epoll.poll(timeout)
                gone = False
                for fd, mask in events:
                    gone |= self._on_event(fd, mask)
                if gone or time.monotonic() >= next_scan:
                    self.rescan()
                    next_scan = time.monotonic() + self._rescan_s
        except BaseException as err:  # the agent's supervision sees it through ``error``
            self.error = err
            log.exception("PSI sensor thread failed")

    def _on_event(self, fd: int, mask: int) -> bool:
        """One epoll event; True when a cgroup went away."""
        with self._lock:
            trigger = self._triggers.get(fd)
            if trigger is None:
                return False
            if mask & select.EPOLLERR:
                # psi.rst: "the monitor ... will receive POLLERR when the cgroup is removed".
                self._stats.cgroups_gone += 1
                self._drop(trigger)
                return True
            self._stats.events_seen += 1
            signal = trigger.rule.signal
            self._events[signal] = self._events.get(signal, 0) + 1
        record = self.record_for(trigger)
        try:
            self._callback(record)
        except queue.Full:  # the agent's bounded queue: counted, never blocking the poll
            with self._lock:
                self._stats.records_dropped += 1
            return False
        with self._lock:
            self._stats.records_emitted += 1
            self._emitted[signal] = self._emitted.get(signal, 0) + 1
        return False

    def record_for(self, trigger: _Trigger) -> SensorRecord:
        """The record of a crossing: the value is the stall share the trigger guarantees, or
        the 10 s average when that is higher (the kernel says only "at least this much")."""
        rule = trigger.rule
        try:
            reading = parse_pressure(trigger.path.read_text())
        except (OSError, ValueError) as err:
            log.info("PSI: cannot read %s after a crossing: %s", trigger.path, err)
            reading = None
        avg = reading.avg10(rule.stall) if reading is not None else 0.0
        return SensorRecord(
            signal=rule.signal,
            tgid=0,
            pid=0,
            ppid=0,
            comm="",
            cgroup_id=trigger.inode,
            count=max(rule.threshold_pct, math.ceil(avg)),
            window_s=rule.window_us / 1e6,
            elapsed_s=rule.window_us / 1e6,
            ts_boot_ns=self._boot_ns(),
            key=trigger.inode,
            rule=rule.rule,
            generation=rule.generation,
        )


# -- identification ---------------------------------------------------------------------------


class NotActionable(IdentityUnverified):
    """A pressure offender remedy may notify about but not act on here."""

    outcome = "unverified"


@dataclass
class HostPin:
    """The handle of the host as an offender: never exits, signals nothing."""

    def has_exited(self) -> bool:
        return False

    def send_signal(self, sig: int) -> None:
        """Nothing: the host is notify-only (docs/psi.md)."""

    def close(self) -> None:
        """Nothing held."""


@dataclass
class Cgroup2Pin:
    """A cgroup2 directory pinned by the inode it was identified with."""

    directory: Path
    inode: int

    def has_exited(self) -> bool:
        try:
            return os.stat(self.directory).st_ino != self.inode
        except OSError:
            return True

    def send_signal(self, sig: int) -> None:
        """Nothing: a cgroup is no process (see remedy.sensors.identify.CgroupPin)."""

    def close(self) -> None:
        """Nothing held."""


def _usage(procfs: ProcFS, pid: int, resource: str) -> int:
    """How much of ``resource`` the process uses: resident pages (memory), CPU ticks spent
    (cpu), bytes read and written (io). 0 when unreadable."""
    base = procfs.root / str(pid)
    try:
        if resource == "memory":
            return int((base / "statm").read_text().split()[1])
        if resource == "cpu":
            stat = (base / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        io = dict(line.split(": ", 1) for line in (base / "io").read_text().splitlines())
        return int(io["read_bytes"]) + int(io["write_bytes"])
    except (OSError, ValueError, IndexError, KeyError):
        return 0


def heaviest(pids: Iterable[int], procfs: ProcFS, resource: str) -> list[tuple[int, int]]:
    """(usage, pid) of ``pids``, heaviest first (ties: the lower pid first)."""
    usage = ((_usage(procfs, pid, resource), pid) for pid in pids)
    return sorted(usage, key=lambda x: (-x[0], x[1]))


@dataclass
class PsiIdentifier:
    """Identification for pressure records; every other record goes to ``inner``.

    A cgroup offender is the cgroup2 directory the trigger was armed on, pinned by its inode.
    On a host where cgroups are acted on through another hierarchy (hybrid: v1 controllers),
    that directory is not what an action would reach, so only notify-only rules get it; the
    rest are refused (never the same name in another hierarchy, which may be another cgroup).
    ``heaviest``: the member using most of the pressured resource, pinned by a pidfd, still in
    the cgroup once pinned, and never one ``spare`` protects, pid 1, the agent or a kernel
    thread: those are passed over for the next heaviest.
    """

    inner: Identifier
    rules: Mapping[int, PsiRule]
    procfs: ProcFS
    cgroups: CgroupDriver
    spare: Callable[[ProcessInfo], str | None] = lambda _info: None
    cgroup2_root: Path = CGROUP2_ROOT
    max_candidates: int = 64
    agent_pid: int = field(default_factory=os.getpid)

    def identify(self, record: SensorRecord) -> Subject:
        if record.signal not in PRESSURE_SIGNALS:
            return self.inner.identify(record)
        rule = self.rules.get(record.rule)
        if rule is None:
            raise IdentityUnverified(f"{record.signal}: no pressure rule {record.rule} (reloaded?)")
        if rule.host:
            return self._host()
        rel, directory = self._cgroup(record)
        if rule.heaviest:
            return self._heaviest(record, rule, rel, directory)
        acts_here = self.cgroups.version == 2 and Path(self.cgroups.root) == self.cgroup2_root
        if not acts_here and not rule.notify_only:
            raise NotActionable(
                f"{record.signal}: {rel} is a cgroup2 cgroup but actions go through cgroup "
                f"v{self.cgroups.version} at {self.cgroups.root}; policy {rule.policy} may "
                "only notify about it here (or use offender: heaviest)",
                cgroup=rel,
            )
        return Subject(
            pid=0,
            start_ticks=record.key,
            comm="",
            ppid=0,
            exe=None,
            uid=-1,
            is_kernel_thread=False,
            cgroup=rel,
            cgroup_display=str(directory),
            handle=Cgroup2Pin(directory, record.key),
            cgroup_inode=record.key,
            members=tuple(self._member(pid) for pid in self._pids(directory)),
        )

    def _host(self) -> Subject:
        inode = os.stat(self.cgroup2_root).st_ino
        return Subject(
            pid=0,
            start_ticks=inode,
            comm="",
            ppid=0,
            exe=None,
            uid=-1,
            is_kernel_thread=False,
            cgroup="/",  # the reach gate refuses the root cgroup, whatever a playbook says
            cgroup_display="host",
            handle=HostPin(),
            cgroup_inode=inode,
        )

    def _cgroup(self, record: SensorRecord) -> tuple[str, Path]:
        """The cgroup2 directory with the record's inode, found by walking (a removed one, or
        one replaced under the same name, is never found)."""
        for dirpath, _dirs, _files in os.walk(self.cgroup2_root):
            try:
                if os.stat(dirpath).st_ino != record.key:
                    continue
            except OSError:
                continue
            rel = "/" + Path(dirpath).relative_to(self.cgroup2_root).as_posix()
            if rel == "/.":
                break  # the root is never a cgroup offender
            return rel, Path(dirpath)
        raise IdentityUnverified(
            f"{record.signal}: no cgroup2 directory with inode {record.key} (removed since?)"
        )

    @staticmethod
    def _pids(directory: Path) -> list[int]:
        pids: set[int] = set()
        for procs in directory.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in procs.read_text().split())
        return sorted(pids)

    def _member(self, pid: int) -> Member:
        try:
            info = self.procfs.read(pid)
        except ActionError:
            return Member(pid)
        return Member(pid, info.exe, info.is_kernel_thread, info.start_ticks, info.uid)

    def _heaviest(self, record: SensorRecord, rule: PsiRule, rel: str, directory: Path) -> Subject:
        passed: list[str] = []
        ranked = heaviest(self._pids(directory), self.procfs, rule.resource)
        for _usage_value, pid in ranked[: self.max_candidates]:
            if pid in (1, self.agent_pid):
                continue
            try:
                handle = ProcessHandle.bind(
                    pid, self.procfs, started_before_ns=record.ts_boot_ns, policy=rule.policy
                )
            except ActionError:
                continue  # exited (or unreadable) since the listing
            try:
                subject = self._pinned(handle, record, pid, passed)
            except BaseException:
                handle.close()
                raise
            if subject is not None:
                return subject
            handle.close()
        raise NotActionable(
            f"{record.signal}: no process of {rel} may be picked"
            + (f" (passed over: {', '.join(passed)})" if passed else " (empty)"),
            cgroup=rel,
        )

    def _pinned(
        self, handle: ProcessHandle, record: SensorRecord, pid: int, passed: list[str]
    ) -> Subject | None:
        """A subject for the pinned process, or None (noted in ``passed``) when it may not be
        picked: protected, a kernel thread, or no longer in the pressured cgroup."""
        info = handle.info
        why = "a kernel thread" if info.is_kernel_thread else self.spare(info)
        if why:
            passed.append(f"pid {pid} ({why})")
            return None
        try:
            # Checked after the pidfd pins it: a process that moved out (or a reused pid) is
            # not the pressured cgroup's.
            if self.procfs.cgroup2_inode(pid, self.cgroup2_root) != record.key:
                passed.append(f"pid {pid} (left the cgroup)")
                return None
            cgroup = self.cgroups.cgroup_of(pid)
            inode = self.cgroups.inode(cgroup) if cgroup != "/" else 0
        except ProcessGone:
            return None
        except (ActionError, RemedyError) as err:
            passed.append(f"pid {pid} ({err})")
            return None
        return Subject.pinned(
            info,
            handle,
            cgroup,
            self.cgroups.display_path(cgroup),
            cgroup_inode=inode,
        )


def is_pressure(signal: str) -> bool:
    """True for the signals this module senses (they need no BPF)."""
    return signal in PRESSURE_SIGNALS
