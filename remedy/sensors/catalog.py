"""The signal catalogue: every runaway pattern remedy watches, and how the kernel counts it.

Each signal has a stable numeric id (an index into the kernel's per-signal config and counter
arrays: KEEP IN SYNC with ``enum remedy_signal`` in bpf/remedy.bpf.c), the key it aggregates by,
how events add up, the unit of a policy's ``threshold``, and the tracepoints it needs. Sections
group signals compiled together: a section is only compiled and attached when a policy uses one
of its signals, because attaching ``syscalls:*`` tracepoints slows every syscall on the host.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from remedy.sensors.records import SensorRecord

if TYPE_CHECKING:
    from remedy.compiler import SensorPlan


class Mode(enum.IntEnum):
    """How events of a signal add up in a window (KEEP IN SYNC with enum remedy_mode)."""

    COUNT = 0  # each event adds one (or a signed delta); cross when the sum reaches threshold
    LEVEL = 1  # each event reports a level; cross when a level is at or above threshold
    GROWTH = 2  # each event reports a level; the value is the level minus the window's first


KeyKind = Literal["process", "parent", "cgroup"]


@dataclass(frozen=True)
class Signal:
    """One entry of the catalogue."""

    name: str
    id: int
    section: str
    key: KeyKind  # process: the acting tgid; parent: its parent's tgid; cgroup: its cgroup id
    mode: Mode
    unit: str  # what a policy's threshold counts
    noun: str  # for messages: "57 forks in 1 s"
    tracepoints: tuple[str, ...]
    description: str


_S = Signal
CATALOGUE: tuple[Signal, ...] = (
    _S(
        "fork_rate",
        0,
        "sched",
        "process",
        Mode.COUNT,
        "forks per window",
        "forks",
        ("sched:sched_process_fork",),
        "forks per process",
    ),
    _S(
        "fork_rate_cgroup",
        1,
        "sched",
        "cgroup",
        Mode.COUNT,
        "forks per window",
        "forks",
        ("sched:sched_process_fork",),
        "forks per cgroup: a bomb spread over many pids",
    ),
    _S(
        "exec_rate",
        2,
        "sched",
        "parent",
        Mode.COUNT,
        "execs per window",
        "execs",
        ("sched:sched_process_exec", "sched:sched_process_fork"),
        "execs by the children of one parent: a crash loop or exec storm",
    ),
    _S(
        "exec_rate_cgroup",
        3,
        "sched",
        "cgroup",
        Mode.COUNT,
        "execs per window",
        "execs",
        ("sched:sched_process_exec",),
        "execs per cgroup",
    ),
    _S(
        "churn",
        4,
        "sched",
        "parent",
        Mode.COUNT,
        "short-lived children per window",
        "short-lived children",
        ("sched:sched_process_fork", "sched:sched_process_exit"),
        "children that exit within `lifetime` of their fork, per parent",
    ),
    _S(
        "cpu",
        5,
        "cpu",
        "process",
        Mode.COUNT,
        "percent of one core over the window",
        "% of a core",
        ("sched:sched_stat_runtime",),
        "CPU time per process as a share of a core, sustained for `sustain` windows",
    ),
    _S(
        "rss",
        6,
        "memory",
        "process",
        Mode.LEVEL,
        "MiB of anonymous resident memory",
        "MiB",
        ("kmem:rss_stat", "sched:sched_process_exec"),
        "anonymous resident memory per process past a size",
    ),
    _S(
        "open_rate",
        7,
        "files",
        "process",
        Mode.COUNT,
        "successful opens per window",
        "opens",
        ("syscalls:sys_exit_openat",),
        "successful opens per process",
    ),
    _S(
        "fd_growth",
        8,
        "files",
        "process",
        Mode.COUNT,
        "net descriptors opened per window",
        "descriptors",
        ("syscalls:sys_exit_openat", "syscalls:sys_exit_close"),
        "descriptors opened minus closed per process: a leak",
    ),
    _S(
        "connect_rate",
        9,
        "net",
        "process",
        Mode.COUNT,
        "connects per window",
        "connects",
        ("syscalls:sys_enter_connect",),
        "outbound connect() calls per process",
    ),
    _S(
        "rss_growth",
        10,
        "memory",
        "process",
        Mode.GROWTH,
        "MiB of anonymous resident memory gained per window",
        "MiB gained",
        ("kmem:rss_stat", "sched:sched_process_exec"),
        "anonymous resident memory now minus at the window's start: a leak, sustained with `for`",
    ),
)
#: Pressure signals (PSI, remedy/sensors/psi.py): the kernel filters them through its own
#: triggers, so section "psi" needs no BPF. Kept out of CATALOGUE, whose ids index the BPF
#: program's arrays; their ids start at PSI_ID_BASE and never reach the kernel sensor.
PSI_ID_BASE = 100
PSI_CATALOGUE: tuple[Signal, ...] = tuple(
    _S(
        f"{resource}_pressure",
        PSI_ID_BASE + index,
        "psi",
        "cgroup",
        Mode.LEVEL,
        "percent of the window stalled",
        "% stalled",
        (),
        f"{resource} pressure (PSI) per cgroup or for the host: share of the window in which "
        f"{what} stalled waiting for {resource}",
    )
    for index, (resource, what) in enumerate(
        (("cpu", "runnable tasks"), ("memory", "tasks"), ("io", "tasks"))
    )
)
SIGNALS: Mapping[str, Signal] = {s.name: s for s in (*CATALOGUE, *PSI_CATALOGUE)}
BY_ID: Mapping[int, Signal] = {s.id: s for s in CATALOGUE}
SECTIONS: tuple[str, ...] = ("sched", "cpu", "memory", "files", "net")
#: Sections a sensor other than the BPF program serves.
NO_BPF_SECTIONS: tuple[str, ...] = ("psi",)


def needs_bpf(name: str) -> bool:
    """Whether the kernel sensor (or its /proc sampler fallback) watches signal ``name``; the
    pressure signals are the PSI sensor's."""
    return SIGNALS[name].section not in NO_BPF_SECTIONS


def sections_for(names: Iterable[str]) -> tuple[str, ...]:
    """The program sections the given signals need, in a stable order."""
    wanted = {SIGNALS[n].section for n in names}
    return tuple(s for s in SECTIONS if s in wanted)


@dataclass(frozen=True)
class SignalSettings:
    """One threshold per signal, as before issue 12. Goes away with its last callers (the
    engine half moves the sampler, replay and trace to the plan); the kernel sensor takes a
    :class:`~remedy.compiler.plan.SensorPlan`."""

    window_s: float
    threshold: int  # in the signal's unit (Signal.unit)
    sustain: int = 1  # consecutive crossing windows before a record leaves the kernel
    lifetime_s: float = 0.1  # churn: a child living less than this is short-lived


@dataclass(frozen=True)
class SignalCounters:
    """Per-signal counters, summed over CPUs."""

    events_seen: int = 0
    records_emitted: int = 0
    ringbuf_failed: int = 0  # records lost: the ring buffer was full
    windows_opened: int = 0
    key_init_failed: int = 0  # events not counted: the window map refused a new key


class Sensor(Protocol):
    """A source of records: the kernel funnel, or the /proc sampler where BPF cannot run.

    Records: exactly one per (key, window, tier) at most; a key crossing a higher tier in the same
    window emits again (the record names the higher tier's rule). The tier's generation is copied
    into the record. While held, a key emits only for tiers not yet emitted during the incident.
    """

    kind: Literal["kernel", "sampler"]

    def start(self, plan: SensorPlan) -> None:
        """Begin watching ``plan.signals``."""
        ...

    def configure(self, plan: SensorPlan) -> None:
        """New tiers, thresholds and generation; never recompiles when the signal set is
        unchanged."""
        ...

    def open_ring_buffer(self, callback: _Callback) -> None:
        """Route each record to ``callback`` (called from poll())."""
        ...

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending records, waiting up to ``timeout_ms`` for the first."""
        ...

    def counters(self) -> Mapping[str, SignalCounters]:
        """Counters by signal name."""
        ...

    def measure(self, record: SensorRecord) -> int | None:
        """Current value of the record's window (its rule's class, key, key_birth) in the
        signal's unit."""
        ...

    def hold(self, record: SensorRecord) -> None:
        """An incident is open for (signal, rule's class, key, key_birth): tiers already
        emitted for it are not re-emitted in later windows."""
        ...

    def unhold(self, record: SensorRecord) -> None:
        """The incident ended: the next crossing emits again."""
        ...

    def close(self) -> None: ...


class _Callback(Protocol):
    def __call__(self, record: SensorRecord, /) -> None: ...
