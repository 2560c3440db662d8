"""The fork-storm sensor: ``bpf/forkstorm.bpf.c`` and its user-space face."""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from remedy.errors import SensorError
from remedy.sensors import bpf
from remedy.sensors.records import SensorRecord

SIGNAL = "fork_rate"
PROGRAM = "forkstorm"
TASK_COMM_LEN = 16


class Counter(enum.IntEnum):
    """Indexes of the per-CPU counters; KEEP IN SYNC with enum fork_counter."""

    EVENTS_SEEN = 0
    RECORDS_EMITTED = 1
    RINGBUF_FAILED = 2
    WINDOWS_OPENED = 3
    KEY_INIT_FAILED = 4


class ForkConfigC(ctypes.Structure):
    """Mirror of struct fork_config (KEEP IN SYNC with bpf/forkstorm.bpf.c)."""

    _fields_ = (
        ("window_ns", ctypes.c_uint64),
        ("threshold", ctypes.c_uint64),
        ("naive", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class ForkRecordC(ctypes.Structure):
    """Mirror of struct fork_record (KEEP IN SYNC with bpf/forkstorm.bpf.c)."""

    _fields_ = (
        ("ts_boot_ns", ctypes.c_uint64),
        ("window_start_ns", ctypes.c_uint64),
        ("window_ns", ctypes.c_uint64),
        ("count", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("child_pid", ctypes.c_uint32),
        ("comm", ctypes.c_char * TASK_COMM_LEN),
    )


@dataclass(frozen=True)
class ForkCounters:
    """Kernel-side counters, summed over CPUs."""

    events_seen: int
    records_emitted: int
    ringbuf_failed: int
    windows_opened: int
    key_init_failed: int


@dataclass(frozen=True)
class ForkSettings:
    """What the kernel filter needs: window and threshold from the policy, sizes from the agent."""

    window_s: float
    threshold: int
    naive: bool = False
    map_entries: int = 16384
    ringbuf_pages: int = 16

    def config(self) -> ForkConfigC:
        return ForkConfigC(
            window_ns=int(self.window_s * 1e9), threshold=self.threshold, naive=int(self.naive)
        )


def decode(raw: ForkRecordC) -> SensorRecord:
    """Turn the kernel's struct into a SensorRecord."""
    return SensorRecord(
        signal=SIGNAL,
        tgid=raw.tgid,
        pid=raw.pid,
        ppid=raw.ppid,
        comm=raw.comm.decode("utf-8", "replace"),
        cgroup_id=raw.cgroup_id,
        count=raw.count,
        window_s=raw.window_ns / 1e9,
        elapsed_s=(raw.ts_boot_ns - raw.window_start_ns) / 1e9,
        ts_boot_ns=raw.ts_boot_ns,
    )


class ForkSensor:
    """Owns the loaded program. Not thread-safe: poll() belongs to the reader thread."""

    def __init__(self, settings: ForkSettings) -> None:
        self.settings = settings
        self._bpf: Any = None

    def defines(self) -> dict[str, int]:
        return {
            "FORK_MAP_ENTRIES": self.settings.map_entries,
            "FORK_RINGBUF_PAGES": self.settings.ringbuf_pages,
        }

    def source(self) -> str:
        """The program text and flags, as bcc compiles them (``remedy run --ebpf``)."""
        text, cflags = bpf.render_source(PROGRAM, self.defines())
        return f"// cflags: {' '.join(cflags)}\n{text}"

    def start(self) -> None:
        """Compile, load and attach; then write the configuration (which arms the filter)."""
        bpf.require_tracepoint("sched", "sched_process_fork")
        self._bpf = bpf.load(PROGRAM, self.defines())
        self.configure(self.settings)

    def _table(self, name: str) -> Any:
        if self._bpf is None:
            raise SensorError("fork sensor is not started")
        return self._bpf[name.encode()]

    def configure(self, settings: ForkSettings) -> None:
        """Change window, threshold or mode at run time: a map write, no recompilation."""
        self.settings = settings
        table = self._table("fork_config")
        table[ctypes.c_int(0)] = settings.config()

    def open_ring_buffer(self, callback: Callable[[SensorRecord], None]) -> None:
        """Route every record to ``callback`` (called from poll())."""

        def _on_event(_ctx: Any, data: Any, _size: int) -> None:
            raw = ctypes.cast(data, ctypes.POINTER(ForkRecordC)).contents
            callback(decode(raw))

        self._table("fork_events").open_ring_buffer(_on_event)

    def poll(self, timeout_ms: int) -> None:
        """Drain the ring buffer in one batch, waiting up to ``timeout_ms`` for the first record."""
        if self._bpf is None:
            raise SensorError("fork sensor is not started")
        self._bpf.ring_buffer_poll(timeout_ms)

    def counters(self) -> ForkCounters:
        sums = bpf.percpu_sums(self._table("fork_counters"), len(Counter))
        return ForkCounters(*sums)

    def window_count(self, tgid: int) -> int | None:
        """The current count of a process's window (tests and diagnostics)."""
        table = self._table("fork_windows")
        try:
            return int(table[ctypes.c_uint32(tgid)].count)
        except KeyError:
            return None

    def layout_types(self) -> tuple[Any, Any]:
        """bcc's own ctypes types for the config and record structs, to check our mirrors."""
        return (self._table("fork_config").Leaf, self._table("record_layout").Leaf)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
