"""The agent: sensor → reader thread → bounded queue → worker thread → engine → sinks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import resource
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import detect
from remedy.actions.registry import ActionExecutor
from remedy.clock import Clock, SystemClock
from remedy.engine.decisions import DecisionSink
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.errors import SensorError
from remedy.policy import PolicySet, load_policy_set
from remedy.proc import ProcFS
from remedy.sensors.forkstorm import SIGNAL, ForkSensor, ForkSettings
from remedy.sensors.reader import RingBufferReader
from remedy.sensors.records import SensorRecord
from remedy.service.audit import AuditLog, ConsoleSink, FanOut
from remedy.service.identify import ProcIdentifier
from remedy.windows.counting import WindowCounter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    """Everything ``remedy run`` can set."""

    policy_paths: tuple[Path, ...]
    playbook_paths: tuple[Path, ...]
    dry_run: bool = False
    audit_path: Path | None = None
    duration_s: float | None = None
    quarantine_root: str = "/remedy"
    stats_path: Path | None = None
    naive: bool = False  # every fork crosses to user space (the benchmark's baseline)
    queue_size: int = 4096
    poll_ms: int = 100
    cgroup_root: Path = Path("/sys/fs/cgroup")
    proc_root: Path = Path("/proc")


@dataclass
class AgentStats:
    """What one run did; printed at exit and written as JSON with ``--stats``."""

    mode: str = "funnel"
    dry_run: bool = True
    events_seen: int = 0
    records_emitted: int = 0
    ringbuf_failed: int = 0
    records_received: int = 0
    queue_full: int = 0
    records_processed: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    engine: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # the whole run, start-up (compiling the BPF program) included
    ready_cpu_s: float = 0.0  # start-up alone: cpu_s - ready_cpu_s is the cost of watching
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Agent:
    """One agent run. ``run()`` blocks until the duration ends or ``request_stop()``."""

    def __init__(
        self, options: AgentOptions, *, clock: Clock | None = None, out: TextIO = sys.stdout
    ) -> None:
        self.options = options
        self._clock = clock or SystemClock()
        self._out = out
        self._stop = threading.Event()
        self.stats = AgentStats(
            mode="naive" if options.naive else "funnel", dry_run=options.dry_run
        )

    def request_stop(self) -> None:
        self._stop.set()

    def _say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def _fork_settings(self, policies: PolicySet) -> ForkSettings:
        fork = policies.for_signal(SIGNAL)
        if not fork:
            raise SensorError(f"no policy for signal {SIGNAL}: nothing to watch")
        return ForkSettings(
            window_s=fork[0].window_s, threshold=fork[0].threshold, naive=self.options.naive
        )

    def _engine(self, policies: PolicySet, sink: DecisionSink) -> Engine:
        procfs = ProcFS(self.options.proc_root)
        cgroups = detect(self.options.cgroup_root, procfs)
        ctx = ActionContext(cgroups, procfs, self.options.quarantine_root)
        self._say(f"cgroups: v{cgroups.version} at {cgroups.root}")
        return Engine(
            policies,
            identifier=ProcIdentifier(procfs, cgroups),
            executor=ActionExecutor(ctx),
            sink=sink,
            clock=self._clock,
            protector=Protector.for_this_agent(procfs, os.getpid()),
            dry_run=self.options.dry_run,
        )

    def run(self) -> AgentStats:
        """Load policies (invalid ones raise ConfigErrors before anything starts), then watch."""
        opts = self.options
        policies = load_policy_set(opts.policy_paths, opts.playbook_paths)
        settings = self._fork_settings(policies)
        sinks: list[DecisionSink] = [ConsoleSink(self._out)]
        audit = AuditLog(opts.audit_path) if opts.audit_path else None
        if audit is not None:
            sinks.append(audit)
        engine = self._engine(policies, FanOut(sinks))
        sensor = ForkSensor(settings)
        records: queue.Queue[SensorRecord] = queue.Queue(maxsize=opts.queue_size)
        reader = RingBufferReader(sensor, records, poll_ms=opts.poll_ms)
        started_cpu, started_wall = _cpu_seconds(), time.monotonic()
        try:
            sensor.start()
            reader.start()
            worker = threading.Thread(
                target=self._work, args=(engine, records, reader, settings), name="remedy-worker"
            )
            worker.start()
            self.stats.ready_cpu_s = round(_cpu_seconds() - started_cpu, 3)
            mode = "dry-run (audit only)" if opts.dry_run else "enforce"
            self._say(
                f"ready: watching sched:sched_process_fork, {settings.threshold} forks per "
                f"{settings.window_s:g} s, {len(policies.policies)} policy(ies), mode {mode}"
                + (", naive" if opts.naive else "")
            )
            self._stop.wait(opts.duration_s)
            self._stop.set()
            reader.stop()
            worker.join()
            if reader.error is not None:
                raise SensorError(f"ring buffer reader failed: {reader.error}") from reader.error
            self._fill_stats(sensor, reader, engine)
        finally:
            self._stop.set()
            reader.stop()
            engine.close()
            sensor.close()
            if audit is not None:
                audit.close()
        self.stats.cpu_s = round(_cpu_seconds() - started_cpu, 3)
        self.stats.wall_s = round(time.monotonic() - started_wall, 3)
        self._report()
        return self.stats

    def _work(
        self,
        engine: Engine,
        records: queue.Queue[SensorRecord],
        reader: RingBufferReader,
        settings: ForkSettings,
    ) -> None:
        naive = WindowCounter(settings.window_s, settings.threshold) if settings.naive else None
        while not (self._stop.is_set() and records.empty()):
            if reader.error is not None:
                self._stop.set()
                return
            try:
                record = records.get(timeout=0.2)
            except queue.Empty:
                engine.tick()
                continue
            self.stats.records_processed += 1
            if naive is not None:
                crossed = self._count_naive(naive, record)
                if crossed is None:
                    continue
                record = crossed
            engine.on_record(record)
            engine.tick()

    @staticmethod
    def _count_naive(counter: WindowCounter, record: SensorRecord) -> SensorRecord | None:
        """Naive mode: the kernel sent every fork; window and threshold are applied here."""
        now = record.ts_boot_ns / 1e9
        if not counter.add(record.tgid, now):
            return None
        start = counter.started(record.tgid) or now
        return dataclasses.replace(record, count=counter.threshold, elapsed_s=now - start)

    def _fill_stats(self, sensor: ForkSensor, reader: RingBufferReader, engine: Engine) -> None:
        c = sensor.counters()
        self.stats.events_seen = c.events_seen
        self.stats.records_emitted = c.records_emitted
        self.stats.ringbuf_failed = c.ringbuf_failed
        self.stats.records_received = reader.received
        self.stats.queue_full = reader.queue_full
        self.stats.engine = dict(engine.stats)
        self.stats.decisions = dict(
            Counter(
                {
                    k.removeprefix("decision-"): v
                    for k, v in engine.stats.items()
                    if k.startswith("decision-")
                }
            )
        )

    def _report(self) -> None:
        s = self.stats
        lost = s.ringbuf_failed + s.queue_full
        self._say(
            f"stopped: {s.events_seen:,} kernel events, {s.records_emitted:,} records to user "
            f"space, {sum(s.decisions.values())} decision(s) {s.decisions}, "
            f"{lost} lost, {s.cpu_s:.2f} s CPU"
        )
        if lost:
            self._say(f"WARNING: {lost} record(s) lost (ring buffer full or queue full)")
        if self.options.stats_path is not None:
            self.options.stats_path.write_text(json.dumps(s.to_json(), indent=2) + "\n")
