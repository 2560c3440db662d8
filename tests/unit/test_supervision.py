"""The supervised worker: a failure deciding one record is that record's alone (audited as
error, counted, the next record decided); a worker that dies or gets stuck ends the agent,
non-zero, within a bounded time; /healthz and /readyz say so over HTTP."""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from remedy.clock import FakeClock
from remedy.compiler import SensorPlan
from remedy.engine.decisions import Decision
from remedy.errors import RemedyError
from remedy.sensors.catalog import SignalCounters
from remedy.sensors.records import SensorRecord
from remedy.service.agent import Agent, AgentOptions
from remedy.service.audit import AuditLog
from remedy.service.health import (
    EXIT_WORKER_FAILED,
    FAULT_LOG_EVERY_S,
    Health,
    WorkerDied,
    supervise,
)
from remedy.service.metrics import Metrics
from remedy.tools import auditquery

BOUND_S = 5.0  # every wait in this file ends within this, pass or fail


def record(pid: int) -> SensorRecord:
    return SensorRecord("fork_rate", pid, pid, 1, f"storm{pid}", 7, 300, 1.0, 0.1, 0, key=pid)


@dataclass
class _Policy:
    name: str


@dataclass
class _Policies:
    def for_signal(self, signal: str) -> list[_Policy]:
        return [_Policy("test-fork")] if signal == "fork_rate" else []


@dataclass
class FakeEngine:
    """Decides by remembering; ``fail`` maps a pid to what deciding it raises, once.
    ``block`` makes deciding that pid wait for the event (a stuck step)."""

    fail: dict[int, BaseException] = field(default_factory=dict)
    tick_error: Exception | None = None
    block: dict[int, threading.Event] = field(default_factory=dict)
    decided: list[int] = field(default_factory=list)
    ticks: int = 0
    policies: _Policies = field(default_factory=_Policies)
    stats: dict[str, int] = field(default_factory=dict)

    def on_record(self, rec: SensorRecord) -> None:
        if rec.tgid in self.block:
            self.block[rec.tgid].wait(BOUND_S * 4)
        err = self.fail.pop(rec.tgid, None)
        if err is not None:
            raise err
        self.decided.append(rec.tgid)

    def tick(self) -> None:
        self.ticks += 1
        if self.tick_error is not None:
            raise self.tick_error

    def offenders(self) -> Iterator[Any]:
        return iter(())

    def silences(self) -> tuple[Any, ...]:
        return ()


class FakeReader:
    error: BaseException | None = None
    queue_full = 0
    received = 0


class FakeSensor:
    kind = "kernel"

    def counters(self) -> dict[str, SignalCounters]:
        return {}


class ListSink:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


class Aborted(Exception):
    """What the fake abort raises instead of ending the test process."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def fake_abort(code: int) -> NoReturn:
    raise Aborted(code)


@dataclass
class Harness:
    agent: Agent
    engine: FakeEngine
    records: queue.Queue[SensorRecord]
    sink: ListSink
    worker: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self.worker = self.agent._start_worker(
            self.engine,  # type: ignore[arg-type]
            self.records,
            FakeReader(),  # type: ignore[arg-type]
            FakeSensor(),  # type: ignore[arg-type]
            SensorPlan({}),
        )
        return self.worker

    def stop(self) -> None:
        self.agent.request_stop()
        for event in self.engine.block.values():
            event.set()
        if self.worker is not None:
            self.worker.join(BOUND_S)
            assert not self.worker.is_alive()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    sink = ListSink()
    options = AgentOptions((), (), supervise_poll_s=0.02)
    clock = FakeClock()
    agent = Agent(
        options, clock=clock, sinks=[sink], health=Health(clock.monotonic), abort=fake_abort
    )
    h = Harness(agent, FakeEngine(), queue.Queue(), sink)
    yield h
    h.stop()


def wait_until(what: str, cond: Any) -> None:
    deadline = time.monotonic() + BOUND_S
    while not cond():
        assert time.monotonic() < deadline, f"not within {BOUND_S} s: {what}"
        time.sleep(0.01)


# -- a failure is that record's alone ---------------------------------------------------------


@pytest.mark.parametrize(
    "err",
    [KeyError("frobnicate"), OSError(28, "No space left on device"), RuntimeError("bcc")],
    ids=lambda e: type(e).__name__,
)
def test_a_record_whose_decision_fails_is_audited_as_error_and_the_next_is_decided(
    harness: Harness, err: Exception
) -> None:
    harness.engine.fail[101] = err
    harness.records.put(record(101))
    harness.records.put(record(102))
    worker = harness.start()
    wait_until("the next record is decided", lambda: 102 in harness.engine.decided)
    assert worker.is_alive()
    (error,) = [d for d in harness.sink.decisions if d.outcome == "error"]
    assert (error.pid, error.policy, error.signal, error.comm) == (
        101,
        "test-fork",
        "fork_rate",
        "storm101",
    )
    assert type(err).__name__ in error.reason and str(err) in error.reason
    assert harness.agent.health.faults() == {("record", type(err).__name__): 1}


def test_an_error_decision_is_a_valid_audit_line(harness: Harness, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with contextlib.closing(AuditLog(path)) as audit:
        harness.agent._sinks = (audit,)
        harness.engine.fail[101] = KeyError("frobnicate")
        harness.records.put(record(101))
        harness.records.put(record(102))
        harness.start()
        wait_until("the next record is decided", lambda: 102 in harness.engine.decided)
    out = io.StringIO()
    assert auditquery.main(path, outcome="error", out=out) == 0
    assert "frobnicate" in out.getvalue() and "101" in out.getvalue()
    assert auditquery.main(path, check=True, out=io.StringIO(), err=io.StringIO()) == 0


def test_a_sink_that_fails_does_not_keep_the_error_from_the_others(harness: Harness) -> None:
    class Broken:
        def record(self, decision: Decision) -> None:
            raise OSError(28, "No space left on device")

    harness.agent._sinks = (Broken(), harness.sink)
    harness.engine.fail[101] = KeyError("x")
    harness.records.put(record(101))
    harness.records.put(record(102))
    harness.start()
    wait_until("the next record is decided", lambda: 102 in harness.engine.decided)
    assert [d.outcome for d in harness.sink.decisions] == ["error"]
    assert harness.agent.health.faults()[("error-decision", "OSError")] == 1


def test_a_tick_that_always_fails_is_contained_and_logged_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # A journal record naming an unknown action raises in every tick (issue 11).
    harness.engine.tick_error = KeyError("frobnicate")
    caplog.set_level(logging.ERROR, logger="remedy.service.health")
    harness.start()
    wait_until("several ticks", lambda: harness.engine.ticks >= 5)
    harness.records.put(record(103))
    wait_until("a record after the failing ticks", lambda: 103 in harness.engine.decided)
    assert harness.agent.health.faults()[("tick", "KeyError")] >= 5
    logged = [r for r in caplog.records if r.name == "remedy.service.health"]
    assert len(logged) == 1, "a fault repeating every tick is logged once, then now and then"
    assert logged[0].exc_info is not None, "with its traceback"
    assert "frobnicate" in caplog.text


def test_a_repeating_fault_is_logged_again_after_a_while(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    health = Health(clock.monotonic)
    caplog.set_level(logging.ERROR, logger="remedy.service.health")
    for _ in range(4):
        health.fault("tick", KeyError("frobnicate"))
    clock.advance(FAULT_LOG_EVERY_S)
    health.fault("tick", KeyError("frobnicate"))
    logged = [r.getMessage() for r in caplog.records if r.name == "remedy.service.health"]
    assert len(logged) == 2
    assert "tick failed 4 more time(s) with KeyError" in logged[1]
    assert health.faults() == {("tick", "KeyError"): 5}


# -- a worker that cannot go on ends the agent ------------------------------------------------


def _supervised(harness: Harness) -> tuple[threading.Thread, list[BaseException]]:
    """Run the agent's main-thread wait in a thread, so a regression hangs nothing."""
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            harness.agent._supervise()
        except BaseException as err:
            raised.append(err)

    main = threading.Thread(target=wait, daemon=True)
    main.start()
    return main, raised


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_ends_the_agent_with_a_remedy_error(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # SystemExit is not an Exception: nothing contains it, the worker thread just ends.
    harness.engine.fail[101] = SystemExit(0)
    harness.start()
    main, raised = _supervised(harness)
    started = time.monotonic()
    harness.records.put(record(101))
    main.join(BOUND_S)
    assert not main.is_alive(), "the main thread waited on a dead worker"
    assert time.monotonic() - started < 1.0
    (err,) = raised
    assert isinstance(err, WorkerDied) and isinstance(err, RemedyError)  # `remedy run` exits 2
    assert "worker thread died" in str(err) and "SystemExit" in str(err)
    assert "FATAL" in capsys.readouterr().err


def test_a_worker_stuck_while_records_wait_ends_the_process(harness: Harness) -> None:
    clock = harness.agent._clock
    assert isinstance(clock, FakeClock)
    harness.engine.block[101] = threading.Event()
    harness.records.put(record(101))
    harness.records.put(record(102))  # waits behind the stuck one
    harness.start()
    main, raised = _supervised(harness)
    time.sleep(0.1)
    assert not raised, "a fresh heartbeat is not stuck"
    clock.advance(harness.agent.health.stall_s + 1)
    main.join(BOUND_S)
    assert not main.is_alive()
    (err,) = raised
    assert isinstance(err, Aborted) and err.code == EXIT_WORKER_FAILED != 0
    assert harness.agent.health.liveness().ok is False


def test_shutdown_never_waits_on_a_stuck_worker(harness: Harness) -> None:
    clock = harness.agent._clock
    assert isinstance(clock, FakeClock)
    harness.engine.block[101] = threading.Event()
    harness.records.put(record(101))
    harness.records.put(record(102))
    worker = harness.start()
    wait_until("the worker takes the first record", lambda: harness.records.qsize() == 1)
    harness.agent.request_stop()
    harness.agent.health.stopping()
    clock.advance(harness.agent.health.stall_s + 1)
    started = time.monotonic()
    with pytest.raises(Aborted) as aborted:
        harness.agent._join(worker)
    assert aborted.value.code == EXIT_WORKER_FAILED
    assert time.monotonic() - started < BOUND_S


def test_a_slow_step_with_nothing_waiting_is_not_stuck_yet(harness: Harness) -> None:
    clock = harness.agent._clock
    assert isinstance(clock, FakeClock)
    harness.engine.block[101] = threading.Event()
    harness.records.put(record(101))
    harness.start()
    wait_until("the worker takes the record", harness.records.empty)
    clock.advance(harness.agent.health.stall_s + 1)
    assert harness.agent.health.problem() is None
    clock.advance(harness.agent.health.idle_stall_s)
    assert "stuck" in (harness.agent.health.problem() or "")


def test_supervise_returns_on_stop_and_at_the_end_of_the_run() -> None:
    health = Health()
    stop = threading.Event()
    started = time.monotonic()
    supervise(health, stop, duration_s=0.1, poll_s=0.02, abort=fake_abort)
    assert 0.1 <= time.monotonic() - started < BOUND_S
    stop.set()
    supervise(health, stop, poll_s=0.02, abort=fake_abort)


# -- /healthz and /readyz ---------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Metrics, Health, FakeClock, int]]:
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("0\n")
    metrics = Metrics(pid=1234, proc_root=tmp_path / "proc", bpf_stats_path=sysctl)
    clock = FakeClock()
    health = Health(clock.monotonic)
    # What the agent does: metrics is an observer, so it is handed the agent's health.
    Agent(AgentOptions((), ()), observers=[metrics], health=health)
    port = metrics.serve("127.0.0.1", 0)
    yield metrics, health, clock, port
    metrics.close()


def _running_worker(health: Health, waiting: int) -> threading.Event:
    done = threading.Event()
    thread = threading.Thread(target=done.wait, args=(BOUND_S * 4,), daemon=True)
    thread.start()
    health.worker_started(thread, lambda: waiting)
    return done


def test_healthz_is_503_when_the_heartbeat_is_stale(
    served: tuple[Metrics, Health, FakeClock, int],
) -> None:
    _metrics, health, clock, port = served
    assert _get(port, "/healthz")[0] == 503  # starting: no worker yet
    done = _running_worker(health, waiting=3)
    try:
        health.beat()
        status, body = _get(port, "/healthz")
        assert status == 200 and body.startswith("ok")
        clock.advance(health.stall_s + 1)
        status, body = _get(port, "/healthz")
        assert status == 503 and "no heartbeat" in body and "3 record(s) waiting" in body
        assert _get(port, "/readyz")[0] == 503  # not alive: not ready either
        health.beat()
        assert _get(port, "/healthz")[0] == 200
    finally:
        done.set()


def test_healthz_is_503_when_the_worker_died(
    served: tuple[Metrics, Health, FakeClock, int],
) -> None:
    _metrics, health, _clock, port = served
    done = _running_worker(health, waiting=0)
    done.set()
    assert health.worker is not None
    health.worker.join(BOUND_S)
    status, body = _get(port, "/healthz")
    assert status == 503 and "died" in body


def test_readyz_needs_the_sensor_policies_and_a_writable_audit(
    served: tuple[Metrics, Health, FakeClock, int], tmp_path: Path
) -> None:
    metrics, health, _clock, port = served
    done = _running_worker(health, waiting=0)
    try:
        sensor_alive = [True]
        assert "sensor" in _get(port, "/readyz")[1]
        health.sensor_up("kernel", lambda: sensor_alive[0])
        assert "no policies" in _get(port, "/readyz")[1]
        health.policies_loaded(2)
        health.audit_at(tmp_path / "gone" / "audit.jsonl")  # its directory does not exist
        status, body = _get(port, "/readyz")
        assert status == 503 and "not writable" in body
        health.audit_at(tmp_path / "audit.jsonl")
        status, body = _get(port, "/readyz")
        assert status == 200 and body.startswith("ready: kernel sensor, 2 policy(ies)")
        sensor_alive[0] = False  # the reader thread stopped polling
        assert _get(port, "/readyz")[0] == 503
        assert _get(port, "/metrics")[0] == 200  # the exporter still answers
        assert metrics.probe("/healthz").ok
    finally:
        done.set()


def test_worker_errors_are_a_metric(served: tuple[Metrics, Health, FakeClock, int]) -> None:
    metrics, health, _clock, _port = served
    health.fault("tick", KeyError("frobnicate"))
    health.fault("tick", KeyError("frobnicate"))
    health.fault("record", OSError(28, "No space left on device"))
    text = metrics.exposition().decode()
    assert 'remedy_worker_errors_total{exception="KeyError",site="tick"} 2.0' in text
    assert 'remedy_worker_errors_total{exception="OSError",site="record"} 1.0' in text
    assert "remedy_worker_heartbeat_age_seconds" in text
