"""Prometheus metrics: the funnel per signal, decisions, offenders, and what the agent costs.

``Metrics`` is both a decision sink (every decision counts once) and an observer (the agent's
once-a-second snapshot). It owns its registry, so two agents in one test process never share
series, and nothing leaks into prometheus_client's global default registry.

The funnel counters are cumulative in the kernel; they are exported through a collector that
reads the latest snapshot at scrape time. A Prometheus counter must never go down: should a
source restart below its last value, the last value is carried as an offset. When the agent
itself restarts every counter starts again at 0, which Prometheus treats as a counter reset.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from remedy.engine.decisions import BREAKER_TRIPPED, Decision
from remedy.engine.offender import STATES
from remedy.service.health import Health, Verdict
from remedy.status import AgentSnapshot

__all__ = [
    "BPF_STATS_SYSCTL",
    "BpfProgramStats",
    "Metrics",
    "bpf_program_stats",
    "enable_bpf_stats",
    "reason_class",
]

log = logging.getLogger(__name__)

BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")

# Reason prefixes written by the engine (remedy/engine/engine.py); the rest is "other".
_REASON_PREFIXES: tuple[tuple[str, str], ...] = (
    ("cooldown", "cooldown"),
    ("rate limit", "rate_limit"),
    ("protected:", "protected"),
    ("silenced by", "silenced"),
    ("another policy is remediating", "precedence"),
    ("degraded window", "degraded"),
    ("demoted to monitor by its breaker", "breaker"),
    ("dry-run", "dry_run"),
    ("monitor mode", "monitor"),
    ("threshold crossed", "threshold"),
)


def reason_class(decision: Decision) -> str:
    """A bounded label for a decision's free-text reason: cooldown, rate_limit, protected,
    silenced, precedence, degraded, breaker, dry_run, monitor, threshold or other."""
    if decision.outcome == BREAKER_TRIPPED:
        return "breaker"
    for prefix, cls in _REASON_PREFIXES:
        if decision.reason.startswith(prefix):
            return cls
    return "other"


@dataclass(frozen=True)
class BpfProgramStats:
    """remedy's BPF programs as the kernel accounts them. ``run_time_ns`` and ``run_cnt`` only
    grow while kernel.bpf_stats_enabled is 1."""

    programs: int = 0
    run_time_ns: int = 0
    run_cnt: int = 0


_FDINFO_FIELD = re.compile(r"^(prog_type|prog_id|run_time_ns|run_cnt):\s+(\d+)$", re.MULTILINE)


def bpf_program_stats(pid: int, proc_root: Path = Path("/proc")) -> BpfProgramStats:
    """Sum the run time and count of the BPF programs ``pid`` holds open.

    The agent does not expose program ids, but the kernel lists them in the fdinfo of every BPF
    program descriptor (kernel/bpf/syscall.c, bpf_prog_show_fdinfo: prog_type, prog_id,
    run_time_ns, run_cnt, ...). Reading our own fdinfo needs no bpftool and no privileges, and
    attributes programs to the agent exactly. A program held through several descriptors counts
    once (by prog_id).
    """
    seen: dict[int, tuple[int, int]] = {}
    fdinfo = proc_root / str(pid) / "fdinfo"
    try:
        entries = list(fdinfo.iterdir())
    except OSError:
        return BpfProgramStats()
    for entry in entries:
        try:
            text = entry.read_text()
        except OSError:  # the descriptor closed while we looked
            continue
        if "prog_type:" not in text:
            continue
        fields = {m.group(1): int(m.group(2)) for m in _FDINFO_FIELD.finditer(text)}
        prog_id = fields.get("prog_id", -int(entry.name) - 1)
        seen[prog_id] = (fields.get("run_time_ns", 0), fields.get("run_cnt", 0))
    return BpfProgramStats(
        programs=len(seen),
        run_time_ns=sum(t for t, _ in seen.values()),
        run_cnt=sum(c for _, c in seen.values()),
    )


def enable_bpf_stats(path: Path = BPF_STATS_SYSCTL) -> tuple[bool, str]:
    """Turn on the kernel's BPF run-time accounting when we may. Returns (enabled now, what
    happened, in words). Accounting costs two clock reads per program run, so it is off by
    default in the kernel; remedy's programs run on every fork, and that cost is small."""
    try:
        if path.read_text().strip() == "1":
            return True, "kernel.bpf_stats_enabled was already 1"
    except OSError as err:
        return False, f"cannot read {path}: {err.strerror}"
    if os.geteuid() != 0:
        return False, "kernel.bpf_stats_enabled is 0 and we are not root: BPF run time stays 0"
    try:
        path.write_text("1\n")
    except OSError as err:
        return False, f"cannot enable kernel.bpf_stats_enabled: {err.strerror}"
    return True, "enabled kernel.bpf_stats_enabled=1 for BPF run-time metrics"


PROBES = ("/healthz", "/readyz")


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per request: a slow scrape never delays a probe."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    """No access log on stderr: probes come every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Monotonic:
    """Cumulative sources made safe for counters: a source that restarts below its last value
    keeps counting from where it was."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], float] = {}
        self._offset: dict[tuple[str, ...], float] = {}

    def __call__(self, key: tuple[str, ...], value: float) -> float:
        last = self._last.get(key, 0.0)
        if value < last:
            self._offset[key] = self._offset.get(key, 0.0) + last
        self._last[key] = value
        return self._offset.get(key, 0.0) + value


class _SnapshotCollector(Collector):
    """Everything that comes from the agent's snapshot or the kernel, built at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics._families())


class Metrics:
    """Prometheus metrics for one agent: a DecisionSink and an Observer.

    ``pid`` is the process whose BPF programs are accounted (the agent: this process).
    ``exposition()`` renders the text format; ``serve()`` starts the HTTP exporter.
    """

    def __init__(
        self,
        *,
        pid: int | None = None,
        proc_root: Path = Path("/proc"),
        bpf_stats_path: Path = BPF_STATS_SYSCTL,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._pid = os.getpid() if pid is None else pid
        self._proc_root = proc_root
        self._bpf_stats_path = bpf_stats_path
        self._lock = threading.Lock()
        self._snapshot: AgentSnapshot | None = None
        self._monotonic = _Monotonic()
        self._server: Any = None
        self._health: Health | None = None
        self._restore_bpf_stats = False
        self._decisions = Counter(
            "remedy_decisions",
            "Decisions of the engine, by policy, outcome and the class of their reason.",
            ("policy", "outcome", "reason_class"),
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(self))

    # -- DecisionSink / Observer --------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        """Count one decision."""
        self._decisions.labels(decision.policy, decision.outcome, reason_class(decision)).inc()

    def observe(self, snapshot: AgentSnapshot) -> None:
        """Keep the latest snapshot; it is read at scrape time."""
        with self._lock:
            self._snapshot = snapshot

    def watch_health(self, health: Health) -> None:
        """Serve this agent's health on /healthz and /readyz (the agent calls it)."""
        self._health = health

    def probe(self, path: str) -> Verdict:
        """The answer of /healthz (the worker's heartbeat is fresh) or /readyz (also: sensor
        attached, policies loaded, audit writable)."""
        health = self._health
        if health is None:
            return Verdict(False, "no agent is running")
        return health.liveness() if path == "/healthz" else health.readiness()

    # -- exporting ----------------------------------------------------------------------------

    def enable_bpf_stats(self) -> str:
        """Turn on kernel BPF run-time accounting where allowed; says what happened."""
        before = self._bpf_stats_path.read_text().strip() if self._bpf_stats_path.exists() else ""
        enabled, what = enable_bpf_stats(self._bpf_stats_path)
        self._restore_bpf_stats = enabled and before == "0"
        return what + ("; set back to 0 at exit" if self._restore_bpf_stats else "")

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP server on a daemon thread: /metrics, /healthz and /readyz. Returns
        the bound port (``port`` 0 picks a free one)."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type("_Server", (_ThreadingServer,), {"address_family": family[0][0]})
        server: WSGIServer = make_server(
            host, port, self._app(), server_class, handler_class=_Quiet
        )
        threading.Thread(target=server.serve_forever, name="remedy-metrics", daemon=True).start()
        self._server = server
        bound: int = server.server_address[1]
        return bound

    def _app(self) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
        """The exporter's WSGI app, with the two probes in front of it."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path not in PROBES:
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            verdict = self.probe(path)
            body = (verdict.text + "\n").encode()
            status = "200 OK" if verdict.ok else "503 Service Unavailable"
            headers = [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ]
            start_response(status, headers)
            return [body]

        return app

    def close(self) -> None:
        """Stop the HTTP exporter, if serving; put kernel.bpf_stats_enabled back if we set it."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._restore_bpf_stats:
            self._restore_bpf_stats = False
            try:
                self._bpf_stats_path.write_text("0\n")
            except OSError as err:
                log.warning("cannot set kernel.bpf_stats_enabled back to 0: %s", err)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)

    # -- the snapshot collector ---------------------------------------------------------------

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=list(labels))

    def _families(self) -> list[Metric]:
        with self._lock:
            snap = self._snapshot
            mono = self._monotonic
            funnel = {
                "kernel_events": ("events_seen", "Events the kernel programs counted."),
                "records_emitted": ("records_emitted", "Records the kernel sent to user space."),
                "ringbuf_drops": ("ringbuf_failed", "Records lost: the ring buffer was full."),
                "map_failures": (
                    "key_init_failed",
                    "Events not counted: the window map refused a new key.",
                ),
            }
            families: list[Metric] = []
            for short, (field_name, doc) in funnel.items():
                fam = self._counter(f"remedy_{short}", doc, ("signal",))
                for signal, counters in sorted((snap.counters if snap else {}).items()):
                    value = getattr(counters, field_name)
                    fam.add_metric([signal], mono((short, signal), value))
                families.append(fam)
            received = self._counter(
                "remedy_records_received", "Records the reader took off the ring buffer."
            )
            drops = self._counter(
                "remedy_queue_drops", "Records dropped: the worker's queue was full."
            )
            cpu = self._counter("remedy_agent_cpu_seconds", "CPU time of the agent process.")
            rss = GaugeMetricFamily(
                "remedy_agent_resident_memory_mib", "Peak resident memory of the agent, MiB."
            )
            resident = GaugeMetricFamily(
                "remedy_agent_rss_mib",
                "Resident memory of the agent now, MiB, by kind: anon (heap, Python objects) "
                "and file (libraries). The peak above is the compile at start.",
                labels=["kind"],
            )
            offenders = GaugeMetricFamily(
                "remedy_offenders", "Offenders the engine tracks, by state.", labels=["state"]
            )
            sensor = GaugeMetricFamily(
                "remedy_sensor_info", "The sensor in use: kernel or sampler.", labels=["kind"]
            )
            throttles = GaugeMetricFamily(
                "remedy_active_throttles",
                "Reversible changes in force (undo journal entries not yet reverted).",
            )
            failing = GaugeMetricFamily(
                "remedy_reverts_failing",
                "Reversible changes still in force because their revert failed (retried with "
                "backoff): a throttle nobody could undo yet. Alert on > 0.",
            )
            reloads = self._counter(
                "remedy_reloads", "Policy reloads (SIGHUP), by result.", ("result",)
            )
            if snap is not None:
                received.add_metric([], mono(("received",), snap.records_received))
                drops.add_metric([], mono(("queue",), snap.queue_full))
                cpu.add_metric([], mono(("cpu",), snap.cpu_s))
                rss.add_metric([], snap.max_rss_mib)
                resident.add_metric(["anon"], snap.rss_anon_mib)
                resident.add_metric(["file"], snap.rss_mib - snap.rss_anon_mib)
                by_state = {state: 0 for state in STATES}
                for offender in snap.offenders:
                    by_state[offender.state] = by_state.get(offender.state, 0) + 1
                for state, n in by_state.items():
                    offenders.add_metric([state], n)
                sensor.add_metric([snap.sensor], 1)
                throttles.add_metric([], snap.throttles)
                failing.add_metric([], snap.reverts_failing)
                reloads.add_metric(["ok"], mono(("reloads",), snap.reloads))
                reloads.add_metric(["refused"], mono(("reloads-failed",), snap.reloads_failed))
            families += [received, drops, cpu, rss, resident, offenders, sensor, throttles, failing]
            families.append(reloads)
            families += self._health_families()
            families += self._bpf_families(mono)
        return families

    def _health_families(self) -> list[Metric]:
        errors = self._counter(
            "remedy_worker_errors",
            "Failures the worker contained (it went on), by where and exception class. A "
            "record whose decision failed is also audited as outcome error.",
            ("site", "exception"),
        )
        heartbeat = GaugeMetricFamily(
            "remedy_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat."
        )
        health = self._health
        if health is not None:
            for (site, exception), n in sorted(health.faults().items()):
                errors.add_metric([site, exception], n)
            heartbeat.add_metric([], health.heartbeat_age())
        return [errors, heartbeat]

    def _bpf_families(self, mono: _Monotonic) -> list[Metric]:
        stats = bpf_program_stats(self._pid, self._proc_root)
        try:
            enabled = float(self._bpf_stats_path.read_text().strip() == "1")
        except OSError:
            enabled = 0.0
        run_time = self._counter(
            "remedy_bpf_run_time_seconds",
            "Run time of remedy's BPF programs (counted while kernel.bpf_stats_enabled is 1).",
        )
        run_time.add_metric([], mono(("bpf_time",), stats.run_time_ns) / 1e9)
        run_count = self._counter(
            "remedy_bpf_run_count",
            "Runs of remedy's BPF programs (counted while kernel.bpf_stats_enabled is 1).",
        )
        run_count.add_metric([], mono(("bpf_cnt",), stats.run_cnt))
        programs = GaugeMetricFamily("remedy_bpf_programs", "BPF programs the agent holds.")
        programs.add_metric([], stats.programs)
        stats_on = GaugeMetricFamily(
            "remedy_bpf_stats_enabled", "1 when the kernel accounts BPF run time."
        )
        stats_on.add_metric([], enabled)
        return [run_time, run_count, programs, stats_on]
