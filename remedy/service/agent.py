"""The agent: sensor → reader thread → bounded queue → worker thread → engine → sinks."""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol, TextIO

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import detect
from remedy.actions.journal import Journal, RevertFailure
from remedy.actions.registry import ACTIONS, ActionExecutor
from remedy.actions.undoer import Undoer
from remedy.clock import Clock, SystemClock
from remedy.compiler import SensorPlan, compile_plan
from remedy.engine.decisions import Decision, DecisionSink
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.errors import ConfigErrors, RemedyError, SensorError
from remedy.policy import PolicySet, Silence, load_policy_set
from remedy.proc import ProcFS
from remedy.sensors import memory
from remedy.sensors.catalog import Sensor, SignalCounters
from remedy.sensors.fastpath import FastPath, default_protected
from remedy.sensors.kernel import KernelSensor
from remedy.sensors.psi import PsiIdentifier, PsiRule, PsiSensor, psi_rules
from remedy.sensors.reader import RingBufferReader
from remedy.sensors.records import SensorRecord
from remedy.sensors.startup import (
    LossWatch,
    SensorChoice,
    bpf_plan,
    configure_sensor,
    identifier_for,
    incidents_of,
    legacy_settings,
    start_sensor,
    watched,
)
from remedy.service.audit import AuditLog, ConsoleSink, FanOut
from remedy.service.control import (
    ControlServer,
    RecentDecisions,
    StatusBoard,
    WorkerInbox,
    silence_from_request,
    silence_view,
    status_from,
)
from remedy.service.health import EXIT_WORKER_FAILED, Health, HealthWatcher, supervise
from remedy.service.sdnotify import Notifier
from remedy.service.selftest import enforcement_problems, enforcing
from remedy.status import AgentSnapshot, OffenderView
from remedy.windows.counting import WindowCounter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    """Everything ``remedy run`` can set."""

    policy_paths: tuple[Path, ...]
    playbook_paths: tuple[Path, ...]
    dry_run: bool = False
    audit_path: Path | None = None
    audit_max_bytes: int = 64 * 1024 * 1024  # rotate past this size …
    audit_keep: int = 5  # … keeping this many rotated files
    duration_s: float | None = None
    quarantine_root: str = "/remedy"
    stats_path: Path | None = None
    naive: bool = False  # every event crosses to user space (the benchmark's baseline)
    sensor: SensorChoice = "auto"  # auto: the kernel funnel, else the /proc sampler, loudly
    queue_size: int = 4096
    poll_ms: int = 100
    ringbuf_pages: int = 16
    cgroup_root: Path = Path("/sys/fs/cgroup")
    proc_root: Path = Path("/proc")
    journal_path: Path = Path("/var/lib/remedy/undo.jsonl")
    control_socket: Path | None = None  # remedy status/top/silence/release talk to it
    keep_throttles: bool = False  # on shutdown leave reversible changes for their TTL
    supervise_poll_s: float = 0.5  # how often the main thread checks the worker


@dataclass
class AgentStats:
    """What one run did; printed at exit and written as JSON with ``--stats``."""

    mode: str = "funnel"
    sensor: str = "kernel"
    dry_run: bool = True
    events_seen: int = 0
    records_emitted: int = 0
    ringbuf_failed: int = 0
    key_init_failed: int = 0
    records_received: int = 0
    queue_full: int = 0
    records_processed: int = 0
    degraded_records: int = 0
    signals: dict[str, dict[str, int]] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    engine: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # the whole run, start-up (compiling the BPF program) included
    ready_cpu_s: float = 0.0  # start-up alone: cpu_s - ready_cpu_s is the cost of watching
    wall_s: float = 0.0
    reloads: int = 0
    reloads_failed: int = 0
    max_rss_mib: float = 0.0  # peak resident memory of the agent process (the compile)
    rss_mib: float = 0.0  # resident memory at exit, and its anonymous part (docs/memory.md)
    rss_anon_mib: float = 0.0
    released_mib: float = 0.0  # given back after compiling (remedy/sensors/memory.py)
    psi: dict[str, int] = field(default_factory=dict)  # the PSI sensor's counters, when used

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _added(engine: Engine, silence: Silence) -> dict[str, Any]:
    engine.add_silence(silence)
    return {"added": silence.name}


def _resident() -> dict[str, float]:
    """RSS now and its anonymous part, for the snapshot (statm: cheap once a second)."""
    try:
        now = memory.resident()
    except (OSError, ValueError, IndexError):
        return {}
    return {"rss_mib": now.rss_kib / 1024, "rss_anon_mib": now.anon_kib / 1024}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _error_decision(
    when: float, policy: str, record: SensorRecord, why: str, dry_run: bool
) -> Decision:
    """The audit line of a record whose decision failed: what the record said, and why."""
    return Decision(
        time=when,
        policy=policy,
        signal=record.signal,
        pid=record.tgid,
        start_ticks=0,  # not identified: the failure may have come first
        comm=record.comm,
        ppid=record.ppid,
        exe=None,
        cgroup="",
        count=record.count,
        window_s=record.window_s,
        action=None,
        step=0,
        dry_run=dry_run,
        outcome="error",
        reason=why,
        message=(
            f"error ({why}): deciding a {record.signal} record for pid {record.tgid} "
            f"({record.comm}) failed; the agent goes on with the next record"
        ),
        state="error",
        degraded=record.degraded,
    )


def _failure_view(failure: RevertFailure | None) -> dict[str, object]:
    """A throttle's revert trouble for status: nothing when its reverts never failed."""
    if failure is None:
        return {}
    return {"revert_failed": {"attempts": failure.attempts, "error": failure.error}}


class Observer(Protocol):
    """Receives a snapshot once a second."""

    def observe(self, snapshot: AgentSnapshot) -> None: ...


class Agent:
    """One agent run. ``run()`` blocks until the duration ends or ``request_stop()``."""

    def __init__(
        self,
        options: AgentOptions,
        *,
        clock: Clock | None = None,
        out: TextIO = sys.stdout,
        sinks: Sequence[DecisionSink] = (),
        observers: Sequence[Observer] = (),
        health: Health | None = None,
        abort: Callable[[int], NoReturn] = os._exit,
    ) -> None:
        self.options = options
        self._clock = clock or SystemClock()
        self.health = health or Health(self._clock.monotonic)
        self._abort = abort  # a stuck worker ends the process at once (see health.supervise)
        self._out = out
        self._extra_sinks = tuple(sinks)  # alerts, metrics: every decision reaches them
        self._observers = tuple(observers)  # metrics, status: a snapshot once a second
        for observer in self._observers:
            if isinstance(observer, HealthWatcher):  # the metrics server's /healthz, /readyz
                observer.watch_health(self.health)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._journal: Journal | None = None
        self._notifier = Notifier()
        self._board = StatusBoard()  # status for the control socket, published once a second
        self._recent = RecentDecisions()
        # Every sink, for error decisions; run() adds the console and the audit log.
        self._sinks: tuple[DecisionSink, ...] = (self._recent, *self._extra_sinks)
        self._inbox = WorkerInbox()  # control requests that must run on the worker thread
        self._undoer: Undoer | None = None
        self._psi: PsiSensor | None = None  # started when a policy watches pressure
        self._psi_rules: dict[int, PsiRule] = {}  # shared with the engine's identifier
        # Compiled as the engine compiles (start, then each reload), so pressure records carry
        # the rule ids and generation it routes by.
        self._psi_plan: SensorPlan | None = None
        mode = "naive" if options.naive else "funnel"
        self.stats = AgentStats(mode=mode, dry_run=options.dry_run)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """Reload policies and playbooks (SIGHUP); done by the worker between records."""
        self._reload.set()

    def _do_reload(self, engine: Engine, sensor: Sensor, losses: LossWatch) -> None:
        """All or nothing: a set that does not load, or needs signals this running program
        cannot watch, is refused and the running set stays in force."""
        opts = self.options
        try:
            policies = load_policy_set(opts.policy_paths, opts.playbook_paths)
            # Stable rule ids, generation + 1: records of the running plan still in flight
            # route by it (the engine keeps the last few plans).
            plan = compile_plan(policies, previous=engine.plan, dry_run=opts.dry_run)
            configure_sensor(sensor, plan)
            self._reload_psi(policies, plan)
        except (ConfigErrors, SensorError, ValueError) as err:
            self.stats.reloads_failed += 1
            self._say(f"reload refused, keeping the running policies:\n{err}")
            return
        self._notifier.reloading()
        try:
            engine.reload(policies, plan)
        except Exception:
            # Failed half way (the worker contains it): systemd must not be left believing a
            # reload is still under way.
            self._notifier.ready("reload failed, see the log")
            raise
        self._notifier.ready(f"reloaded: {len(policies.policies)} policy(ies)")
        losses.reconfigure(plan)
        self.health.policies_loaded(len(policies.policies))
        self.stats.reloads += 1
        self._say(f"reloaded: {len(policies.policies)} policy(ies); offender state kept")

    def _pressure_rules(self, policies: PolicySet, plan: SensorPlan) -> dict[int, PsiRule]:
        """Numbered by the plan the engine routes by (the one compile of this load)."""
        self._psi_plan = plan
        return {r.rule: r for r in psi_rules(policies, plan)}

    def _start_psi(self, records: queue.Queue[SensorRecord], stack: contextlib.ExitStack) -> None:
        """The PSI sensor, feeding the same queue, when a policy watches pressure."""
        if self._psi_rules:
            self._psi = PsiSensor(self._psi_rules.values(), records.put_nowait)
            self._psi.start()
            stack.callback(self._psi.close)

    def _reload_psi(self, policies: PolicySet, plan: SensorPlan) -> None:
        """New pressure rules for the running PSI sensor (started here if it is the first)."""
        rules = self._pressure_rules(policies, plan)
        self._psi_rules.clear()
        self._psi_rules.update(rules)
        if self._psi is not None:
            self._psi.reconfigure(rules.values())
        elif rules:
            self._say("reload: pressure policies need the PSI sensor; restart to start it")

    def _say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def _engine(
        self, policies: PolicySet, plan: SensorPlan, sink: DecisionSink, sensor: Sensor
    ) -> Engine:
        procfs = ProcFS(self.options.proc_root)
        cgroups = detect(self.options.cgroup_root, procfs)
        ctx = ActionContext(cgroups, procfs, self.options.quarantine_root)
        self._say(f"cgroups: v{cgroups.version} at {cgroups.root}")
        # Only when enforcing: the probe creates a cgroup, and dry-run changes nothing.
        if enforcing(policies, self.options.dry_run):
            problems = enforcement_problems(cgroups, self.options.quarantine_root, policies)
            if problems:
                raise RemedyError(
                    "cannot enforce on this host: "
                    + "; ".join(problems)
                    + " (run with --dry-run to audit only)"
                )
        self._journal = Journal(self.options.journal_path, self._clock)
        undoer = self._undoer = Undoer(self._journal, ctx, self._clock, ACTIONS)
        executor = ActionExecutor(ctx, undoer, self._fastpath(sensor))
        # Pressure records are identified by the PSI side (cgroup2 inode, or the heaviest
        # unprotected process, spared as the engine spares: bound once the engine exists).
        identifier = PsiIdentifier(
            identifier_for(sensor, procfs, cgroups, self.options.cgroup_root),
            self._psi_rules,
            procfs,
            cgroups,
        )
        engine = Engine(
            policies,
            identifier=identifier,
            executor=executor,
            sink=sink,
            clock=self._clock,
            protector=Protector.for_this_agent(procfs, os.getpid()),
            dry_run=self.options.dry_run,
            sensor=incidents_of(sensor),
            plan=plan,
            undo=undoer,
            keep_on_close=self.options.keep_throttles,
        )
        identifier.spare = engine.spare
        # Actions that reach beyond the offender (scope tree, cgroup) spare what the engine
        # protects, including the protected executables the configuration adds.
        executor.ctx = undoer.ctx = dataclasses.replace(ctx, spare=engine.spare)
        # Leftovers of a run that died (SIGKILL, power): expired ones are reverted now, the
        # rest expire on schedule. Nothing stays throttled forever.
        for detail in undoer.reconcile():
            self._say(f"reconciled from the journal: {detail}")
        return engine

    def _fastpath(self, sensor: Sensor) -> FastPath | None:
        """The in-kernel fork fast path, armed only by playbook steps marked ``kernel: true``;
        the agent, its ancestors and pid 1 are protected in the kernel too."""
        if not isinstance(sensor, KernelSensor) or "sched" not in sensor.sections:
            return None
        fastpath = FastPath(sensor)
        fastpath.protect(default_protected(self.options.proc_root))
        return fastpath

    def _start_sensor(self, plan: SensorPlan) -> Sensor:
        opts = self.options
        sensor = start_sensor(
            plan, opts.sensor, ringbuf_pages=opts.ringbuf_pages, naive=opts.naive, say=self._say
        )
        self._say_released(sensor)
        return sensor

    def run(self) -> AgentStats:
        """Load policies (invalid ones raise ConfigErrors before anything starts), then watch."""
        opts = self.options
        policies = load_policy_set(opts.policy_paths, opts.playbook_paths)
        plan = compile_plan(policies, dry_run=opts.dry_run)
        self._psi_rules.update(self._pressure_rules(policies, plan))
        records: queue.Queue[SensorRecord] = queue.Queue(maxsize=opts.queue_size)
        started_cpu, started_wall = _cpu_seconds(), time.monotonic()
        # Everything started is stopped in reverse order, whatever fails on the way.
        with contextlib.ExitStack() as stack:
            stack.callback(self._stop.set)
            sinks: list[DecisionSink] = [ConsoleSink(self._out), self._recent, *self._extra_sinks]
            if opts.audit_path:
                audit = AuditLog(
                    opts.audit_path, max_bytes=opts.audit_max_bytes, keep=opts.audit_keep
                )
                sinks.append(stack.enter_context(contextlib.closing(audit)))
            self._sinks = tuple(sinks)
            self.health.policies_loaded(len(policies.policies))
            self.health.audit_at(opts.audit_path)
            sensor = self._start_sensor(plan)
            stack.callback(sensor.close)
            self.stats.sensor = sensor.kind
            engine = self._engine(policies, plan, FanOut(sinks), sensor)
            if self._journal is not None:
                stack.callback(self._journal.close)
            stack.callback(self._close_engine, engine)
            if opts.control_socket is not None:
                control = ControlServer(opts.control_socket, self._control_handler(engine))
                control.start()
                stack.callback(control.stop)
            reader = RingBufferReader(sensor, records, poll_ms=opts.poll_ms)
            reader.start()
            stack.callback(reader.stop)
            self._start_psi(records, stack)
            self.health.sensor_up(sensor.kind, lambda: reader.alive and reader.error is None)
            worker = self._start_worker(engine, records, reader, sensor, plan)
            self.stats.ready_cpu_s = round(_cpu_seconds() - started_cpu, 3)
            ready = self._ready_line(sensor, plan, policies)
            self._say(ready)
            self._notifier.ready(ready.removeprefix("ready: "))
            self._supervise()
            self._stop.set()
            self.health.stopping()
            self._notifier.stopping()
            reader.stop()
            self._join(worker)
            if reader.error is not None:
                raise SensorError(f"ring buffer reader failed: {reader.error}") from reader.error
            self._fill_stats(sensor, reader, engine)
        self.stats.cpu_s = round(_cpu_seconds() - started_cpu, 3)
        self.stats.wall_s = round(time.monotonic() - started_wall, 3)
        self._fill_memory()
        self._report()
        return self.stats

    def _fill_memory(self) -> None:
        # ru_maxrss is in KiB on Linux.
        self.stats.max_rss_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        with contextlib.suppress(OSError):
            now = memory.usage()
            self.stats.rss_mib = round(now.rss_kib / 1024, 1)
            self.stats.rss_anon_mib = round(now.anon_kib / 1024, 1)

    def _say_released(self, sensor: Sensor) -> None:
        released = sensor.released if isinstance(sensor, KernelSensor) else None
        if released is not None:
            self.stats.released_mib = round((released.heap_kib + released.text_kib) / 1024, 1)
            self._say(released.line())

    def _close_engine(self, engine: Engine) -> None:
        """Shutdown reverts through the engine; a failure there is said plainly, with what it
        leaves behind, and the run ends non-zero."""
        try:
            engine.close()
        except Exception as err:
            log.exception("shutdown: closing the engine failed")
            raise RemedyError(
                f"shutdown could not take back every change ({type(err).__name__}: {err}); "
                f"what is left stays in the undo journal {self.options.journal_path} for the "
                "next start"
            ) from err

    def _start_worker(
        self,
        engine: Engine,
        records: queue.Queue[SensorRecord],
        reader: RingBufferReader,
        sensor: Sensor,
        plan: SensorPlan,
    ) -> threading.Thread:
        """Start the worker thread, supervised: what ends it is kept for the fatal report."""

        def run() -> None:
            try:
                self._work(engine, records, reader, sensor, plan)
            except BaseException as err:
                self.health.worker_died(err)
                raise  # threading's excepthook prints the traceback: loud, on stderr

        # A daemon thread: a stuck worker must never keep the process from exiting.
        worker = threading.Thread(target=run, name="remedy-worker", daemon=True)
        self.health.worker_started(worker, records.qsize)
        worker.start()
        return worker

    def _supervise(self) -> None:
        """Wait for a stop or the end of the run; a dead worker raises WorkerDied, a stuck one
        ends the process (health.supervise)."""
        supervise(
            self.health,
            self._stop,
            duration_s=self.options.duration_s,
            poll_s=self.options.supervise_poll_s,
            abort=self._abort,
        )

    def _join(self, worker: threading.Thread) -> None:
        """Wait for the worker to drain its queue and stop, but never on a stuck one: it still
        owns the engine, so the process ends at once, as in :meth:`_supervise`."""
        while worker.is_alive():
            worker.join(self.options.supervise_poll_s)
            problem = self.health.problem()
            if problem is not None and worker.is_alive():
                print(f"remedy: FATAL: at shutdown, {problem}", file=sys.stderr, flush=True)
                self._abort(EXIT_WORKER_FAILED)

    def _ready_line(self, sensor: Sensor, plan: SensorPlan, policies: PolicySet) -> str:
        if self.options.dry_run:
            mode = "dry-run for every policy (audit only)"
        else:
            audit_only = [p.name for p in policies.policies if p.dry_run]
            mode = "enforce" + (f", dry-run: {', '.join(audit_only)}" if audit_only else "")
        how = "kernel funnel" if sensor.kind == "kernel" else "/proc sampler (degraded fidelity)"
        naive = ", naive" if self.options.naive else ""
        pressure = "".join(
            f"; {r.signal} {r.stall} ≥ {r.threshold_pct}% of {r.window_us / 1e6:g} s "
            f"({'host' if r.host else ', '.join(r.cgroups)})"
            for r in self._psi_rules.values()
        )
        return f"ready: {how}{naive}; watching {watched(bpf_plan(plan))}{pressure}; mode {mode}"

    def _work(
        self,
        engine: Engine,
        records: queue.Queue[SensorRecord],
        reader: RingBufferReader,
        sensor: Sensor,
        plan: SensorPlan,
    ) -> None:
        # Naive mode: the kernel sends every event, and each signal's lowest filter is applied
        # here; its records carry no rule (the engine routes them by threshold).
        naive = {
            n: WindowCounter(s.window_s, s.threshold)
            for n, s in legacy_settings(bpf_plan(plan)).items()
        }
        losses = LossWatch(plan)
        next_check = 0.0
        watchdog = self._notifier.watchdog_s
        next_feed = 0.0
        health = self.health
        while not (self._stop.is_set() and records.empty()):
            health.beat()
            if reader.error is not None:
                self._stop.set()
                return
            if watchdog is not None and (now_feed := time.monotonic()) >= next_feed:
                # Fed from the worker: a stuck engine stops feeding and systemd restarts us.
                self._notifier.watchdog()
                next_feed = now_feed + watchdog / 2
            self._inbox.drain()
            if self._reload.is_set():
                self._reload.clear()
                health.beat("reloading policies")
                self._contained("reload", lambda: self._do_reload(engine, sensor, losses))
            now = self._clock.monotonic()
            if now >= next_check:  # counters are per-CPU map reads: once a second is plenty
                next_check = now + 1.0
                health.beat("observing")
                self._contained("observe", lambda: self._check(sensor, reader, engine, losses))
            try:
                record = records.get(timeout=0.2)
            except queue.Empty:
                health.beat("ticking")
                self._contained("tick", engine.tick)
                continue
            self.stats.records_processed += 1
            if self.options.naive:
                crossed = self._count_naive(naive[record.signal], record)
                if crossed is None:
                    continue
                record = crossed
            record = losses.mark(record, now)
            self.stats.degraded_records += record.degraded
            self._decide(engine, record)
            health.beat("ticking")
            self._contained("tick", engine.tick)

    def _check(
        self, sensor: Sensor, reader: RingBufferReader, engine: Engine, losses: LossWatch
    ) -> None:
        now = self._clock.monotonic()
        counters = sensor.counters()
        losses.update(counters, reader.queue_full, now)
        if self._psi is not None:
            if self._psi.error is not None:
                raise SensorError(f"PSI sensor failed: {self._psi.error}") from self._psi.error
            counters = {**counters, **self._psi.signal_counters()}
        self._observe(sensor, counters, reader, engine)

    def _contained(self, site: str, call: Callable[[], object]) -> None:
        """Run one unit of the worker's work; a failure is counted and logged, and the worker
        goes on (an exception here must never end the thread that enforces)."""
        try:
            call()
        except Exception as err:
            if site == "reload":
                self.stats.reloads_failed += 1
            self.health.fault(site, err)

    def _decide(self, engine: Engine, record: SensorRecord) -> None:
        """Decide one record; a failure is that record's alone: audited as ``error``."""
        self.health.beat(f"deciding a {record.signal} record for pid {record.tgid}")
        try:
            engine.on_record(record)
        except Exception as err:
            self.health.fault("record", err)
            self._record_error(engine, record, err)

    def _record_error(self, engine: Engine, record: SensorRecord, err: Exception) -> None:
        """An ``error`` decision for each policy of the record's signal, sent to every sink on
        its own: the sink that failed (a full disk under the audit) must not silence the rest."""
        try:
            names = [p.name for p in engine.policies.for_signal(record.signal)] or ["-"]
        except Exception:  # the engine's own state may be what broke
            names = ["-"]
        why = f"{type(err).__name__}: {err}"
        for name in names:
            decision = _error_decision(self._clock.wall(), name, record, why, self.options.dry_run)
            for sink in self._sinks:
                try:
                    sink.record(decision)
                except Exception as sink_err:
                    self.health.fault("error-decision", sink_err)

    def _control_handler(self, engine: Engine) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Answers the control socket. ``status`` is served from the last published snapshot
        (a busy worker never makes `remedy top` hang); everything that changes the engine runs
        on the worker thread, between records."""

        def handle(req: dict[str, Any]) -> dict[str, Any]:
            op = req.get("op")
            if op == "status":
                return dict(self._board.latest())
            if op == "silence-list":
                return self._inbox.call(
                    lambda: {"silences": [silence_view(x) for x in engine.silences()]}
                )
            if op == "silence-add":
                silence = silence_from_request(req.get("silence", {}))
                return self._inbox.call(lambda: _added(engine, silence))
            if op == "silence-expire":
                name = str(req.get("name", ""))
                return self._inbox.call(lambda: {"expired": engine.expire_silence(name)})
            if op == "release":
                pid, policy = int(req["pid"]), req.get("policy")
                return self._inbox.call(lambda: {"reverted": engine.release_offender(pid, policy)})
            return {"ok": False, "error": f"unknown op {op!r}"}

        return handle

    def _observe(
        self,
        sensor: Sensor,
        counters: Mapping[str, SignalCounters],
        reader: RingBufferReader,
        engine: Engine,
    ) -> None:
        active = self._undoer.journal.active() if self._undoer else []
        failing = self._undoer.journal.failures() if self._undoer else {}
        snapshot = AgentSnapshot(
            sensor=sensor.kind,
            counters=dict(counters),
            records_received=reader.received,
            queue_full=reader.queue_full,
            engine=dict(engine.stats),
            offenders=tuple(
                OffenderView(o.subject.pid, o.subject.comm, o.policy, o.state, o.step)
                for o in engine.offenders()
            ),
            cpu_s=_cpu_seconds(),
            max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            throttles=len(active),
            reverts_failing=sum(1 for r in active if r.id in failing),
            reloads=self.stats.reloads,
            reloads_failed=self.stats.reloads_failed,
            **_resident(),
        )
        throttles = [{**r.to_json(), **_failure_view(failing.get(r.id))} for r in active]
        silences = [silence_view(x) for x in engine.silences()]
        self._board.publish(status_from(snapshot, throttles, self._recent.items(), silences))
        for observer in self._observers:
            try:
                observer.observe(snapshot)
            except Exception:  # an observer must never take the agent down
                log.exception("observer %r failed", observer)

    @staticmethod
    def _count_naive(counter: WindowCounter, record: SensorRecord) -> SensorRecord | None:
        """Naive mode: the kernel sent every event; window and threshold are applied here."""
        now = record.ts_boot_ns / 1e9
        if not counter.add(record.key, now, record.count):
            return None
        start = counter.started(record.key) or now
        total = counter.count(record.key, now)
        return dataclasses.replace(record, count=total, elapsed_s=now - start)

    def _fill_stats(self, sensor: Sensor, reader: RingBufferReader, engine: Engine) -> None:
        counters = sensor.counters()
        if self._psi is not None:
            counters = {**counters, **self._psi.signal_counters()}
            self.stats.psi = self._psi.counters().as_dict()
        used = {n: c for n, c in counters.items() if c.events_seen or c.records_emitted}
        self.stats.signals = {n: dataclasses.asdict(c) for n, c in used.items()}
        self.stats.events_seen = sum(c.events_seen for c in counters.values())
        self.stats.records_emitted = sum(c.records_emitted for c in counters.values())
        self.stats.ringbuf_failed = sum(c.ringbuf_failed for c in counters.values())
        self.stats.key_init_failed = sum(c.key_init_failed for c in counters.values())
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
        lost = s.ringbuf_failed + s.queue_full + s.key_init_failed
        self._say(
            f"stopped: {s.events_seen:,} events seen ({s.sensor}), {s.records_emitted:,} records "
            f"to user space, {sum(s.decisions.values())} decision(s) {s.decisions}, "
            f"{lost} lost, {s.cpu_s:.2f} s CPU"
        )
        if lost:
            self._say(
                f"WARNING: {lost} record(s) or events lost (ring buffer full: {s.ringbuf_failed}, "
                f"queue full: {s.queue_full}, window map full: {s.key_init_failed}); "
                f"{s.degraded_records} record(s) marked degraded"
            )
        if self.options.stats_path is not None:
            self.options.stats_path.write_text(json.dumps(s.to_json(), indent=2) + "\n")
