"""Recorded traces: what crossed the funnel on a real host, and who it was about.

A trace is JSON lines. The first line is a header::

    {"remedy_trace": 1, "host": "...", "recorded_at": "2025-01-01T12:00:00+00:00",
     "signals": {"fork_rate": {"window_s": 1.0, "threshold": 100, "sustain": 1,
                               "lifetime_s": 0.1}}}

then one line per record that crossed the kernel filter, in the order the agent's worker would
have handled them::

    {"t": 1.234567, "record": {...SensorRecord...}, "subject": {...} | null}

``t`` is monotonic seconds since the sensor was ready; ``subject`` is what identification read
(pid, start_ticks, comm, ppid, exe, uid, is_kernel_thread, cgroup, cgroup_display, parents,
context, stack), or null when the process was already gone. ``remedy replay`` feeds a trace to
the real engine (see remedy/tools/replay.py and docs/replay.md).

Reading validates every line and rejects the whole trace on the first bad one with a
:class:`TraceError` that names the file and the line, as the policy loader does for YAML:
unknown keys, missing keys, wrong types and a clock that goes back are all errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from remedy.actions.cgroups import detect
from remedy.compiler import compile_plan
from remedy.engine.offender import Subject
from remedy.errors import ActionError, RemedyError, SensorError
from remedy.policy import load_policy_set
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS, Sensor, SignalSettings
from remedy.sensors.context import Ancestor, ContainerRef, Context, PodRef
from remedy.sensors.reader import RingBufferReader
from remedy.sensors.records import SensorRecord
from remedy.sensors.startup import (
    LossWatch,
    SensorChoice,
    identifier_for,
    legacy_settings,
    start_sensor,
    watched,
)

__all__ = [
    "TRACE_VERSION",
    "RecordOptions",
    "RecordStats",
    "Recorder",
    "TraceEntry",
    "TraceError",
    "TraceHeader",
    "TraceWriter",
    "read_trace",
    "subject_from_json",
    "subject_to_json",
    "write_header",
]

TRACE_VERSION = 1


class TraceError(RemedyError):
    """A trace file could not be read; the message names the file and line."""


@dataclass(frozen=True)
class TraceHeader:
    """The first line: where and when, and the funnel's settings while recording."""

    host: str
    recorded_at: str  # ISO 8601, UTC
    signals: Mapping[str, SignalSettings]

    @classmethod
    def here(cls, signals: Mapping[str, SignalSettings]) -> TraceHeader:
        u = os.uname()
        return cls(
            host=f"{u.nodename} {u.sysname} {u.release} {u.machine}",
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            signals=dict(signals),
        )

    @property
    def recorded_epoch(self) -> float:
        """``recorded_at`` in seconds since the epoch (replay's wall clock starts here)."""
        return datetime.fromisoformat(self.recorded_at).timestamp()

    def to_json(self) -> dict[str, Any]:
        return {
            "remedy_trace": TRACE_VERSION,
            "host": self.host,
            "recorded_at": self.recorded_at,
            "signals": {n: dataclasses.asdict(s) for n, s in sorted(self.signals.items())},
        }


@dataclass(frozen=True)
class TraceEntry:
    """One record as the agent's worker would have seen it, ``t`` seconds into the recording."""

    t: float
    record: SensorRecord
    subject: Subject | None  # None: the process was gone when it was identified
    line: int = 0  # where it was read from, for messages


def _dump(obj: Any) -> str:
    # Sorted keys and no float noise beyond what json itself prints: a trace diff is readable.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def subject_to_json(subject: Subject) -> dict[str, Any]:
    """The identified facts, without the pidfd."""
    return {
        "pid": subject.pid,
        "start_ticks": subject.start_ticks,
        "comm": subject.comm,
        "ppid": subject.ppid,
        "exe": subject.exe,
        "uid": subject.uid,
        "is_kernel_thread": subject.is_kernel_thread,
        "cgroup": subject.cgroup,
        "cgroup_display": subject.cgroup_display,
        "parents": [list(p) for p in subject.parents],
        "context": dataclasses.asdict(subject.context) if subject.context else None,
        "stack": list(subject.stack),
    }


def write_header(out: TextIO, header: TraceHeader) -> None:
    """Write the header line to an open text stream."""
    out.write(_dump(header.to_json()) + "\n")


class TraceWriter:
    """Writes a trace: the header on open, then one line per :meth:`write`. Flushes each line,
    so a recording stopped hard still leaves every line written so far."""

    def __init__(self, path: Path, header: TraceHeader) -> None:
        self.path = path
        self._out = path.open("w", encoding="utf-8")
        self.entries = 0
        write_header(self._out, header)
        self._out.flush()

    def write(self, t: float, record: SensorRecord, subject: Subject | None) -> None:
        line = {
            "t": round(t, 6),
            "record": dataclasses.asdict(record),
            "subject": subject_to_json(subject) if subject is not None else None,
        }
        self._out.write(_dump(line) + "\n")
        self._out.flush()
        self.entries += 1

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


# --- reading ---------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


_TYPES: dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "float": _is_number,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "str | None": lambda v: v is None or isinstance(v, str),
    "int | None": lambda v: v is None or _is_int(v),
    "float | None": lambda v: v is None or _is_number(v),
}


def _fields(
    cls: Any,
    data: Any,
    where: str,
    special: Mapping[str, Callable[[Any, str], Any]] = {},
    skip: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Check ``data`` against the dataclass ``cls``: no unknown keys, every required key, simple
    types by annotation; ``special`` converts the fields that are not simple."""
    if not isinstance(data, dict):
        raise TraceError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TraceError(f"{where}: unknown key(s) {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise TraceError(f"{where}: missing key {name}")
            continue
        value = data[name]
        if name in special:
            out[name] = special[name](value, f"{where}.{name}")
            continue
        check = _TYPES.get(str(f.type))
        if check is not None and not check(value):
            raise TraceError(f"{where}.{name}: expected {f.type}, got {json.dumps(value)}")
        out[name] = float(value) if str(f.type) == "float" else value
    return out


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TraceError(f"{where}: expected a list, got {json.dumps(value)}")
    return value


def _parents(value: Any, where: str) -> tuple[tuple[int, str], ...]:
    out = []
    for i, p in enumerate(_list(value, where)):
        if not (isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and isinstance(p[1], str)):
            raise TraceError(f"{where}[{i}]: expected [pid, comm], got {json.dumps(p)}")
        out.append((p[0], p[1]))
    return tuple(out)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    items = _list(value, where)
    if not all(isinstance(s, str) for s in items):
        raise TraceError(f"{where}: expected a list of strings")
    return tuple(items)


def _container(value: Any, where: str) -> ContainerRef | None:
    return None if value is None else ContainerRef(**_fields(ContainerRef, value, where))


def _pod(value: Any, where: str) -> PodRef | None:
    return None if value is None else PodRef(**_fields(PodRef, value, where))


def _ancestors(value: Any, where: str) -> tuple[Ancestor, ...]:
    return tuple(
        Ancestor(**_fields(Ancestor, a, f"{where}[{i}]")) for i, a in enumerate(_list(value, where))
    )


def _context(value: Any, where: str) -> Context | None:
    if value is None:
        return None
    return Context(
        **_fields(
            Context, value, where, {"container": _container, "parents": _ancestors, "pod": _pod}
        )
    )


def subject_from_json(data: Any, where: str = "subject") -> Subject:
    """A Subject (without a handle) from :func:`subject_to_json`'s output."""
    special = {"parents": _parents, "context": _context, "stack": _strings}
    return Subject(**_fields(Subject, data, where, special, skip=frozenset({"handle"})))


def _record(data: Any, where: str) -> SensorRecord:
    record = SensorRecord(**_fields(SensorRecord, data, where))
    if record.signal not in SIGNALS:
        raise TraceError(f"{where}.signal: unknown signal {record.signal!r}")
    return record


def _header(data: Any, where: str) -> TraceHeader:
    if not isinstance(data, dict) or "remedy_trace" not in data:
        raise TraceError(f"{where}: not a remedy trace (the first line has no remedy_trace)")
    if data["remedy_trace"] != TRACE_VERSION:
        raise TraceError(
            f"{where}: trace format {data['remedy_trace']!r}; this remedy reads {TRACE_VERSION}"
        )
    unknown = sorted(set(data) - {"remedy_trace", "host", "recorded_at", "signals"})
    if unknown:
        raise TraceError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for key in ("host", "recorded_at"):
        if not isinstance(data.get(key), str):
            raise TraceError(f"{where}.{key}: expected a string")
    try:
        datetime.fromisoformat(data["recorded_at"])
    except ValueError:
        raise TraceError(f"{where}.recorded_at: not an ISO 8601 time") from None
    signals = data.get("signals")
    if not isinstance(signals, dict):
        raise TraceError(f"{where}.signals: expected an object")
    settings = {}
    for name, s in signals.items():
        if name not in SIGNALS:
            raise TraceError(f"{where}.signals: unknown signal {name!r}")
        settings[name] = SignalSettings(**_fields(SignalSettings, s, f"{where}.signals.{name}"))
    return TraceHeader(data["host"], data["recorded_at"], settings)


def read_trace(path: Path) -> tuple[TraceHeader, list[TraceEntry]]:
    """Read and validate a whole trace; raises :class:`TraceError` naming ``path:line``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TraceError(f"{path}: cannot read: {err.strerror}") from err
    header: TraceHeader | None = None
    entries: list[TraceEntry] = []
    last_t = 0.0
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise TraceError(f"{where}: not JSON: {err.msg} (column {err.colno})") from None
        if header is None:
            header = _header(data, where)
            continue
        if not isinstance(data, dict):
            raise TraceError(f"{where}: expected an object")
        unknown = sorted(set(data) - {"t", "record", "subject"})
        missing = sorted({"t", "record", "subject"} - set(data))
        if unknown or missing:
            raise TraceError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}")
        t = data["t"]
        if not _is_number(t) or t < 0:
            raise TraceError(f"{where}.t: expected seconds >= 0, got {json.dumps(t)}")
        if t < last_t:
            raise TraceError(f"{where}.t: {t} is before the previous line's {last_t}")
        last_t = float(t)
        record = _record(data["record"], f"{where}: record")
        subject = None
        if data["subject"] is not None:
            subject = subject_from_json(data["subject"], f"{where}: subject")
        entries.append(TraceEntry(float(t), record, subject, number))
    if header is None:
        raise TraceError(f"{path}: empty: no header line")
    return header, entries


# --- recording -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordOptions:
    """Everything ``remedy record`` can set."""

    out_path: Path
    policy_paths: tuple[Path, ...]
    playbook_paths: tuple[Path, ...]
    duration_s: float | None = None
    sensor: SensorChoice = "auto"
    queue_size: int = 4096
    poll_ms: int = 100
    ringbuf_pages: int = 16
    cgroup_root: Path = Path("/sys/fs/cgroup")
    proc_root: Path = Path("/proc")


@dataclass
class RecordStats:
    """What one recording saw."""

    sensor: str = "kernel"
    entries: int = 0
    gone: int = 0  # records whose process had exited before identification
    degraded: int = 0
    queue_full: int = 0
    by_signal: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


class Recorder:
    """The agent's sensing half with no engine: the same funnel settings (from the policies),
    the same reader thread and queue, the same identification and context, the same loss
    marking; every record is written to a trace instead of being decided on.

    Built from the public pieces the agent uses (agent.py is not changed for this).
    """

    def __init__(self, options: RecordOptions, *, out: TextIO = sys.stdout) -> None:
        self.options = options
        self._out = out
        self._stop = threading.Event()
        self.stats = RecordStats()

    def request_stop(self) -> None:
        self._stop.set()

    def _say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def run(self) -> RecordStats:
        """Load policies (invalid ones raise ConfigErrors before anything starts), then record
        until the duration ends or :meth:`request_stop`."""

        opts = self.options
        policies = load_policy_set(opts.policy_paths, opts.playbook_paths)
        plan = compile_plan(policies)
        # The header keeps each signal's lowest tier (the trace format's one filter per
        # signal); records carry their rule and generation.
        settings = legacy_settings(plan)
        records: queue.Queue[SensorRecord] = queue.Queue(maxsize=opts.queue_size)
        started = time.monotonic()
        sensor: Sensor | None = None
        reader: RingBufferReader | None = None
        try:
            sensor = start_sensor(
                plan, opts.sensor, ringbuf_pages=opts.ringbuf_pages, say=self._say
            )
            self.stats.sensor = sensor.kind
            procfs = ProcFS(opts.proc_root)
            identifier = identifier_for(
                sensor, procfs, detect(opts.cgroup_root, procfs), opts.cgroup_root
            )
            with TraceWriter(opts.out_path, TraceHeader.here(settings)) as writer:
                reader = RingBufferReader(sensor, records, poll_ms=opts.poll_ms)
                reader.start()
                origin = time.monotonic()
                self._say(f"ready: recording ({sensor.kind}); watching {watched(plan)}; no actions")
                deadline = None if opts.duration_s is None else origin + opts.duration_s
                losses = LossWatch(plan)
                next_check = 0.0
                while True:
                    now = time.monotonic()
                    stopping = self._stop.is_set() or (deadline is not None and now >= deadline)
                    if stopping and records.empty():
                        break
                    if reader.error is not None:
                        raise SensorError(f"ring buffer reader failed: {reader.error}")
                    if now >= next_check:
                        losses.update(sensor.counters(), reader.queue_full, now)
                        next_check = now + 1.0
                    try:
                        record = records.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    self._write(writer, identifier, losses.mark(record, now), origin)
                reader.stop()
                self.stats.queue_full = reader.queue_full
        finally:
            self._stop.set()
            if reader is not None:
                reader.stop()
            if sensor is not None:
                sensor.close()
        self.stats.wall_s = round(time.monotonic() - started, 3)
        self._report()
        return self.stats

    def _write(
        self, writer: TraceWriter, identifier: Any, record: SensorRecord, origin: float
    ) -> None:
        # The moment the agent's engine would have read its clock for this record.
        t = time.monotonic() - origin
        try:
            subject: Subject | None = identifier.identify(record)
        except ActionError:
            subject = None  # replayed as ProcessGone, as the engine drops it
        try:
            writer.write(t, record, subject)
        finally:
            if subject is not None and subject.handle is not None:
                subject.handle.close()
        self.stats.entries += 1
        self.stats.gone += subject is None
        self.stats.degraded += record.degraded
        self.stats.by_signal[record.signal] = self.stats.by_signal.get(record.signal, 0) + 1

    def _report(self) -> None:
        s = self.stats
        signals = dict(sorted(Counter(s.by_signal).items()))
        self._say(
            f"recorded {s.entries} record(s) {signals} to {self.options.out_path} "
            f"in {s.wall_s:.1f} s ({s.sensor}); {s.gone} gone before identification, "
            f"{s.degraded} degraded, {s.queue_full} dropped (queue full)"
        )
