"""The kernel funnel: ``bpf/remedy.bpf.c`` and its user-space face (the ``Sensor`` protocol)."""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from remedy.errors import SensorError
from remedy.sensors import bpf, btf, memory
from remedy.sensors.catalog import (
    BY_ID,
    SIGNALS,
    SignalCounters,
    SignalSettings,
    needs_bpf,
    sections_for,
)
from remedy.sensors.context import key_hierarchy
from remedy.sensors.records import SensorRecord

PROGRAM = "remedy"
TASK_COMM_LEN = 16
SIG_MAX = len(BY_ID)
CFG_STACKS = 1
REC_DEGRADED = 1
MIB = 1 << 20


class Counter(enum.IntEnum):
    """Per-signal counter indexes; KEEP IN SYNC with enum remedy_counter."""

    EVENTS_SEEN = 0
    RECORDS_EMITTED = 1
    RINGBUF_FAILED = 2
    WINDOWS_OPENED = 3
    KEY_INIT_FAILED = 4


class SignalConfigC(ctypes.Structure):
    """Mirror of struct signal_config (KEEP IN SYNC with bpf/remedy.bpf.c)."""

    _fields_ = (
        ("window_ns", ctypes.c_uint64),
        ("threshold", ctypes.c_int64),
        ("lifetime_ns", ctypes.c_uint64),
        ("sustain", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("naive", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class RecordC(ctypes.Structure):
    """Mirror of struct remedy_record (KEEP IN SYNC with bpf/remedy.bpf.c)."""

    _fields_ = (
        ("ts_boot_ns", ctypes.c_uint64),
        ("window_start_ns", ctypes.c_uint64),
        ("window_ns", ctypes.c_uint64),
        ("value", ctypes.c_int64),
        ("cgroup_id", ctypes.c_uint64),
        ("key", ctypes.c_uint64),
        ("birth_ns", ctypes.c_uint64),
        ("key_birth_ns", ctypes.c_uint64),
        ("signal", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("kstack_id", ctypes.c_int32),
        ("ustack_id", ctypes.c_int32),
        ("_pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * TASK_COMM_LEN),
    )


def to_kernel_threshold(name: str, settings: SignalSettings) -> int:
    """A policy's threshold in the kernel's units: percent of a core becomes nanoseconds of CPU
    per window, MiB become bytes; counts stay counts."""
    if name == "cpu":
        return int(settings.threshold / 100 * settings.window_s * 1e9)
    if name == "rss":
        return settings.threshold * MIB
    return settings.threshold


def to_policy_units(name: str, value: int, window_ns: int) -> int:
    """The inverse of ``to_kernel_threshold``, for the record's count."""
    if name == "cpu":
        return round(value * 100 / window_ns) if window_ns else 0
    if name == "rss":
        return value // MIB
    return value


def decode(raw: RecordC) -> SensorRecord:
    """Turn the kernel's struct into a SensorRecord."""
    name = BY_ID[raw.signal].name
    return SensorRecord(
        signal=name,
        tgid=raw.tgid,
        pid=raw.pid,
        ppid=raw.ppid,
        comm=raw.comm.decode("utf-8", "replace"),
        cgroup_id=raw.cgroup_id,
        count=to_policy_units(name, raw.value, raw.window_ns),
        window_s=raw.window_ns / 1e9,
        elapsed_s=(raw.ts_boot_ns - raw.window_start_ns) / 1e9,
        ts_boot_ns=raw.ts_boot_ns,
        key=raw.key,
        birth_ns=raw.birth_ns,
        key_birth_ns=raw.key_birth_ns,
        degraded=bool(raw.flags & REC_DEGRADED),
        kstack_id=raw.kstack_id,
        ustack_id=raw.ustack_id,
    )


@dataclass(frozen=True)
class Sizes:
    """Compile-time sizes of the kernel maps."""

    map_entries: int = 16384
    ringbuf_pages: int = 16
    stack_entries: int = 1024
    birth_entries: int = 65536  # live processes born since start whose birth can be verified


class IdentityCounter(enum.IntEnum):
    """Indexes of ``identity_counters``; KEEP IN SYNC with enum identity_counter."""

    BIRTH_INSERT_FAILED = 0
    BIRTH_UNREADABLE = 1


class CgroupKeyCounter(enum.IntEnum):
    """Indexes of ``cgroup_key_counters``; KEEP IN SYNC with enum cgroup_key_counter."""

    ROOT = 0  # events in the keyed hierarchy's root: never counted against a cgroup
    UNREADABLE = 1


class KernelSensor:
    """Owns the loaded program. Not thread-safe: poll() belongs to the reader thread, except
    :meth:`birth`, a single map lookup the worker makes while identifying."""

    kind: Literal["kernel", "sampler"] = "kernel"

    def __init__(
        self,
        sizes: Sizes | None = None,
        *,
        naive: bool = False,
        stacks: bool = True,
        offsets: btf.TaskOffsets | None = None,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        cgroup_keys: str | None = None,
    ):
        self.sizes = sizes or Sizes()
        self.naive = naive
        self.stacks = stacks
        self.sections: tuple[str, ...] = ()
        self.settings: dict[str, SignalSettings] = {}
        self._offsets = offsets
        # Which hierarchy cgroup signals are keyed by: "cgroup2" or a v1 controller ("pids").
        self.cgroup_keys = cgroup_keys or key_hierarchy(cgroup_root)
        self._bpf: Any = None
        self._btf: btf.Btf | None = None
        # CLOCK_BOOTTIME once every probe was attached: a process born later has its birth in
        # the births map (or a counted insert failure), one born earlier may not.
        self.started_ns = 0
        self.released: memory.Released | None = None  # what start() gave back after compiling

    def offsets(self) -> btf.TaskOffsets:
        """task_struct offsets of the running kernel (from its BTF, read once)."""
        if self._offsets is None:
            self._offsets = btf.task_offsets(btf=self._kernel_btf())
        return self._offsets

    def _kernel_btf(self) -> btf.Btf:
        """/sys/kernel/btf/vmlinux parsed once (5 MB): task and cgroup offsets share it."""
        if self._btf is None:
            self._btf = btf.Btf.read()
        return self._btf

    def defines(self, sections: tuple[str, ...]) -> dict[str, int]:
        defines = {
            "REMEDY_MAP_ENTRIES": self.sizes.map_entries,
            "REMEDY_RINGBUF_PAGES": self.sizes.ringbuf_pages,
            "REMEDY_STACK_ENTRIES": self.sizes.stack_entries,
            "REMEDY_BIRTH_ENTRIES": self.sizes.birth_entries,
            "REMEDY_EXIT_HAS_GROUP_DEAD": int(
                bpf.tracepoint_has_field("sched", "sched_process_exit", "group_dead")
            ),
            **self.offsets().defines(),
            **self._cgroup_key_defines(),
        }
        defines.update({f"REMEDY_SECTION_{s.upper()}": 1 for s in sections})
        return defines

    def _cgroup_key_defines(self) -> dict[str, int]:
        if self.cgroup_keys == "cgroup2":
            return {"REMEDY_CGROUP_KEY_V1": 0}
        offsets = btf.cgroup_offsets(self.cgroup_keys, btf=self._kernel_btf())
        return {"REMEDY_CGROUP_KEY_V1": 1, **offsets.defines()}

    def source(self, settings: Mapping[str, SignalSettings]) -> str:
        """The program as bcc compiles it, with the configuration user space will write
        (``remedy run --print-bpf``)."""
        sections = sections_for(settings)
        text, cflags = bpf.render_source(PROGRAM, self.defines(sections))
        lines = [f"// cflags: {' '.join(cflags)}", "// signal_config entries written at start:"]
        for name, s in sorted(settings.items()):
            c = self._config(name, s)
            lines.append(
                f"//   [{SIGNALS[name].id}] {name}: window_ns={c.window_ns} "
                f"threshold={c.threshold} sustain={c.sustain} lifetime_ns={c.lifetime_ns} "
                f"mode={c.mode} naive={c.naive}"
            )
        return "\n".join(lines) + "\n" + text

    def start(self, settings: Mapping[str, SignalSettings]) -> None:
        """Compile the sections the signals need, load, attach, then arm the filter."""
        unknown = {n for n in settings if n not in SIGNALS or not needs_bpf(n)}
        if unknown:
            raise SensorError(f"unknown signal(s): {', '.join(sorted(unknown))}")
        for name in settings:
            for tp in SIGNALS[name].tracepoints:
                bpf.require_tracepoint(*tp.split(":"))
        self.sections = sections_for(settings)
        self._bpf = bpf.load(PROGRAM, self.defines(self.sections))
        # The parsed BTF (~20 MiB of objects) and the compiler's leftovers, given back: the
        # offsets are cached, and nothing recompiles before a restart (docs/memory.md).
        self._btf = None
        if self.stacks:
            # Parse kallsyms now, not while deciding the first offender: the table stays
            # (~10 MiB), the garbage of parsing it is given back with the compiler's.
            self._bpf.ksym(0)
        self.released = memory.release_compiler_memory()
        self.started_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.configure(settings)

    def _table(self, name: str) -> Any:
        if self._bpf is None:
            raise SensorError("kernel sensor is not started")
        return self._bpf[name.encode()]

    def _config(self, name: str, s: SignalSettings) -> SignalConfigC:
        return SignalConfigC(
            window_ns=int(s.window_s * 1e9),
            threshold=to_kernel_threshold(name, s),
            lifetime_ns=int(s.lifetime_s * 1e9),
            sustain=max(1, s.sustain),
            mode=int(SIGNALS[name].mode),
            naive=int(self.naive),
            flags=CFG_STACKS if self.stacks else 0,
        )

    def configure(self, settings: Mapping[str, SignalSettings]) -> None:
        """Write every signal's config: a map update, no recompilation. Signals absent from
        ``settings`` are disabled; a signal whose section is not compiled in cannot be enabled."""
        missing = set(sections_for(settings)) - set(self.sections)
        if missing:
            raise SensorError(
                f"section(s) {', '.join(sorted(missing))} not loaded; restart to add signals"
            )
        table = self._table("signal_config")
        for sig in BY_ID.values():  # the BPF program's signals (not the PSI sensor's)
            s = settings.get(sig.name)
            table[ctypes.c_int(sig.id)] = self._config(sig.name, s) if s else SignalConfigC()
        self.settings = dict(settings)

    def open_ring_buffer(self, callback: Callable[[SensorRecord], None]) -> None:
        def _on_event(_ctx: Any, data: Any, _size: int) -> None:
            callback(decode(ctypes.cast(data, ctypes.POINTER(RecordC)).contents))

        self._table("events").open_ring_buffer(_on_event)

    def poll(self, timeout_ms: int) -> None:
        if self._bpf is None:
            raise SensorError("kernel sensor is not started")
        self._bpf.ring_buffer_poll(timeout_ms)

    def counters(self) -> dict[str, SignalCounters]:
        sums = bpf.percpu_sums(self._table("counters"), SIG_MAX * len(Counter))
        n = len(Counter)
        return {
            sig.name: SignalCounters(*sums[sig.id * n : (sig.id + 1) * n]) for sig in BY_ID.values()
        }

    def window_value(self, name: str, key: int, birth: int | None = None) -> int | None:
        """The current raw value of a key's window (tests and diagnostics). Without ``birth``,
        the newest window of any process that held ``key`` (a walk of the map)."""
        table = self._table("windows")
        sig = SIGNALS[name].id
        if birth is not None:
            try:
                return int(table[table.Key(sig, 0, key, birth)].value)
            except KeyError:
                return None
        found = [
            (int(w.start_ns), int(w.value))
            for k, w in table.items()
            if k.signal == sig and k.id == key
        ]
        return max(found)[1] if found else None

    def measure(self, name: str, key: int, birth: int = 0) -> int | None:
        """The key's current window, in the policy's unit (a playbook step's ``until``): 0 when
        its window has ended with no event since (it went quiet), None when the signal is not
        watched. CPU is the share of a core over the part of the window that has passed."""
        settings = self.settings.get(name)
        if settings is None:
            return None
        table = self._table("windows")
        try:
            w = table[table.Key(SIGNALS[name].id, 0, key, birth)]
        except KeyError:
            return 0
        window_ns = int(settings.window_s * 1e9)
        elapsed = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - int(w.start_ns)
        if elapsed >= window_ns:
            return 0
        if name == "cpu":
            return to_policy_units(name, int(w.value), max(elapsed, 1))
        return to_policy_units(name, int(w.value), window_ns)

    def birth(self, tgid: int) -> int | None:
        """The birth (CLOCK_BOOTTIME ns) the kernel recorded when ``tgid``'s current holder was
        forked, or None when it was born before :attr:`started_ns` or the map was full."""
        try:
            return int(self._table("births")[ctypes.c_uint32(tgid)].birth_ns)
        except KeyError:
            return None

    def identity_counters(self) -> dict[str, int]:
        """Summed per-CPU identity counters by name (birth_insert_failed, birth_unreadable)."""
        sums = bpf.percpu_sums(self._table("identity_counters"), len(IdentityCounter))
        return {c.name.lower(): sums[c] for c in IdentityCounter}

    def cgroup_key_counters(self) -> dict[str, int]:
        """Summed per-CPU cgroup key counters by name (root, unreadable): events of cgroup
        signals that were counted against no cgroup."""
        sums = bpf.percpu_sums(self._table("cgroup_key_counters"), len(CgroupKeyCounter))
        return {c.name.lower(): sums[c] for c in CgroupKeyCounter}

    def lineage(self, tgid: int) -> tuple[int, str] | None:
        """(parent tgid, comm) the kernel remembers for ``tgid``: exited processes included."""
        try:
            entry = self._table("lineage")[ctypes.c_uint32(tgid)]
        except KeyError:
            return None
        return int(entry.ppid), bytes(entry.comm).split(b"\0", 1)[0].decode("utf-8", "replace")

    def stack(self, stack_id: int, *, user_pid: int | None = None) -> list[str]:
        """Symbolized frames of a captured stack ("[unknown]" where no symbols exist).

        Read once: the id is then deleted from the stack map, and bcc's symbol cache for
        ``user_pid`` freed. Neither is ever pruned otherwise: the map fills, and then
        bpf_get_stackid fails (-EEXIST on a hash collision, without BPF_F_REUSE_STACKID) for
        every new stack; bcc keeps one symbol cache per pid, for every offender, forever."""
        if stack_id < 0 or self._bpf is None:
            return []
        stacks = self._table("stacks")
        try:
            frames = list(stacks.walk(stack_id))
        except KeyError:
            return []
        with contextlib.suppress(KeyError):  # a record with the same stack deleted it first
            del stacks[stacks.Key(stack_id)]
        if user_pid is None:
            return [self._bpf.ksym(addr).decode("utf-8", "replace") for addr in frames]
        if not _user_symbols_safe():
            return [f"0x{addr:x}" for addr in frames]
        try:
            return [self._bpf.sym(addr, user_pid).decode("utf-8", "replace") for addr in frames]
        finally:
            _drop_symbol_cache(self._bpf, user_pid)

    def table(self, name: str) -> Any:
        """A map of the loaded program by name (for companions such as ``FastPath``)."""
        return self._table(name)

    def layout_types(self) -> tuple[Any, Any]:
        """bcc's own ctypes types for the config and record structs, to check our mirrors."""
        return (self._table("signal_config").Leaf, self._table("record_layout").Leaf)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


@functools.cache
def _user_symbols_safe() -> bool:
    """Whether bcc may build a process's symbol cache. libbcc before 0.33.0 leaves
    ``ModulePath::fd_`` uninitialised for the global /tmp/perf-PID.map of a process whose root
    link cannot be read (one exiting: a zombie) and its destructor closes that junk number
    (bcc #5193): some descriptor of the agent's, an offender's pidfd included, whose number is
    then reused by the next open. User frames stay addresses there."""
    try:
        from bcc.version import __version__  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    numbers = tuple(int(n) for n in re.findall(r"\d+", str(__version__))[:2])
    return numbers >= (0, 33)


def _drop_symbol_cache(loaded: Any, pid: int) -> None:
    """Free bcc's symbol cache for ``pid``: ``BPF.sym`` keeps one per pid in a class-wide dict
    (``BPF._sym_caches``, bcc/__init__.py) with native memory that nothing frees."""
    caches = getattr(type(loaded), "_sym_caches", None)
    cache = caches.pop(pid, None) if isinstance(caches, dict) else None
    if cache is None or getattr(cache, "cache", None) is None:
        return
    from bcc.libbcc import lib  # noqa: PLC0415 - optional dependency, kernel tier only

    lib.bcc_free_symcache(cache.cache, pid)
