"""A terminate's grace period is a timer on the worker's tick: the engine with the real executor,
a fake clock and fake processes (no root, no real signals)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV2Driver
from remedy.actions.params import NotifyParams, TerminateParams
from remedy.actions.registry import ActionExecutor
from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Handle, Subject
from remedy.errors import ActionError, PermissionDenied, ProcessGone
from remedy.policy import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.proc import ProcFS
from remedy.sensors.records import SensorRecord

GRACE_S = 2.0  # real seconds the old, blocking terminate would sleep through


@dataclass
class FakeProcess:
    """A process as its pins see it: SIGTERM ends it only when it does not ignore it."""

    ignores_term: bool
    denies_kill: bool = False  # SIGKILL refused (EPERM: it changed its credentials)
    signals: list[int] = field(default_factory=list)
    exited: bool = False
    open_pins: int = 0

    def pin(self) -> FakePin:
        return FakePin(self)


class FakePin:
    """A pidfd of a fake process: closable on its own, dup()-able like a pidfd."""

    def __init__(self, proc: FakeProcess) -> None:
        self.proc = proc
        self.closed = False
        proc.open_pins += 1

    def has_exited(self) -> bool:
        if self.closed:
            raise ActionError("process handle is closed")
        return self.proc.exited

    def send_signal(self, sig: int) -> None:
        if self.closed:
            raise ActionError("process handle is closed")
        if sig == signal.SIGKILL and self.proc.denies_kill:
            raise PermissionDenied("signal 9: Operation not permitted")
        # A zombie can still be signalled (ESRCH only once it is reaped): the kernel's way.
        self.proc.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.proc.ignores_term):
            self.proc.exited = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.proc.open_pins -= 1

    def dup(self) -> Handle:
        return FakePin(self.proc)


@dataclass
class Identifier:
    procs: dict[int, FakeProcess]

    def identify(self, record: SensorRecord) -> Subject:
        proc = self.procs.get(record.tgid)
        if proc is None or proc.exited:
            raise ProcessGone("exited", pid=record.tgid)
        base = Subject(
            record.tgid, 1000 + record.tgid, "hog", 1, "/usr/bin/hog", 0, False, "/a", "/a"
        )
        return replace(base, handle=proc.pin())


@dataclass
class ListSink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


def _policy(name: str, playbook: str) -> Policy:
    return Policy(
        name=name,
        file=Path(f"policies/{name}.yaml"),
        signal="fork_rate",
        threshold=200,
        window_s=1.0,
        playbook=playbook,
        dry_run=False,
        cooldown_s=1.0,
        release_after_s=60.0,
        rate_limit=RateLimit(max_actions=10, per_s=60.0),
        match=Selector(comms=("hog",)),
    )


def _record(pid: int) -> SensorRecord:
    return SensorRecord("fork_rate", pid, pid, 1, "hog", 1, 500, 1.0, 0.2, 0)


@dataclass
class Rig:
    engine: Engine
    clock: FakeClock
    sink: ListSink
    executor: ActionExecutor

    def lines(self) -> list[tuple[int, str, str | None]]:
        return [(d.pid, d.outcome, d.action) for d in self.sink.decisions]


def _rig(tmp_path: Path, procs: dict[int, FakeProcess]) -> Rig:
    clock = FakeClock()
    (tmp_path / "cg").mkdir()
    ctx = ActionContext(CgroupV2Driver(tmp_path / "cg", ProcFS()), ProcFS(), scope="process")
    executor = ActionExecutor(ctx, clock=clock)
    book = Playbook(
        "end", Path("playbooks/end.yaml"), (Step("terminate", TerminateParams(grace_s=GRACE_S)),)
    )
    sink = ListSink()
    engine = Engine(
        PolicySet((_policy("hogs", "end"),), {"end": book}),
        identifier=Identifier(procs),
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(999, frozenset({1})),
    )
    return Rig(engine, clock, sink, executor)


def test_terminate_returns_at_once_the_worker_decides_others_and_the_tick_kills_after_grace(
    tmp_path: Path,
) -> None:
    stubborn, other = FakeProcess(ignores_term=True), FakeProcess(ignores_term=True)
    r = _rig(tmp_path, {42: stubborn, 43: other})
    began = time.monotonic()
    r.engine.on_record(_record(42))
    # The grace is not slept out on the worker: no real time passed, no SIGKILL yet.
    assert time.monotonic() - began < GRACE_S / 2
    assert stubborn.signals == [signal.SIGTERM, signal.SIGCONT]
    assert r.lines() == [(42, "acted", "terminate")]
    assert "SIGKILL after 2 s" in r.sink.decisions[0].message
    # Meanwhile the worker goes on deciding other records.
    r.clock.advance(0.5)
    r.engine.tick()
    r.engine.on_record(_record(43))
    assert r.lines()[-1] == (43, "acted", "terminate")
    r.clock.advance(1.25)
    r.engine.tick()
    assert signal.SIGKILL not in stubborn.signals  # still inside its grace
    r.clock.advance(0.25)
    r.engine.tick()
    assert stubborn.signals == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]
    kill = r.sink.decisions[2]
    assert (kill.pid, kill.outcome, kill.action) == (42, "acted", "terminate")
    assert kill.reason.startswith("grace of 2 s over")
    assert "SIGKILL to 1 process(es)" in kill.message
    assert signal.SIGKILL not in other.signals  # its own grace is not over
    r.clock.advance(0.5)
    r.engine.tick()
    assert other.signals[-1] == signal.SIGKILL
    assert len(r.executor.timers) == 0
    r.engine.close()
    assert (stubborn.open_pins, other.open_pins) == (0, 0)


def test_the_sigkill_goes_through_the_escalations_own_pin_after_the_engine_let_go(
    tmp_path: Path,
) -> None:
    stubborn = FakeProcess(ignores_term=True)
    r = _rig(tmp_path, {42: stubborn})
    r.engine.on_record(_record(42))
    # The engine's own pin is closed (the offender is released by an operator meanwhile).
    r.engine.release_offender(42)
    assert stubborn.open_pins == 1  # the escalation's duplicate
    r.clock.advance(GRACE_S)
    r.engine.tick()
    assert stubborn.signals[-1] == signal.SIGKILL
    assert stubborn.open_pins == 0


def test_one_that_exits_within_the_grace_is_not_killed_and_its_pin_is_closed(
    tmp_path: Path,
) -> None:
    polite = FakeProcess(ignores_term=False)
    r = _rig(tmp_path, {42: polite})
    r.engine.on_record(_record(42))
    assert polite.exited
    r.clock.advance(0.2)
    r.engine.tick()  # the engine releases the exited offender; the escalation sees the exit
    assert polite.signals == [signal.SIGTERM, signal.SIGCONT]
    assert polite.open_pins == 0
    assert len(r.executor.timers) == 0
    line = r.sink.decisions[-1]
    assert (line.outcome, line.action) == ("skipped", "terminate")
    assert line.reason == "exited within the 2 s grace: no SIGKILL"
    r.clock.advance(GRACE_S)
    r.engine.tick()
    assert signal.SIGKILL not in polite.signals


def test_shutdown_cancels_an_escalation_inside_its_grace_and_carries_out_one_past_it(
    tmp_path: Path,
) -> None:
    early, due = FakeProcess(ignores_term=True), FakeProcess(ignores_term=True)
    r = _rig(tmp_path, {42: due, 43: early})
    r.engine.on_record(_record(42))
    r.clock.advance(GRACE_S - 0.5)
    r.engine.on_record(_record(43))
    r.clock.advance(0.5)  # 42's grace is over, but no tick ran since: the agent stops now
    r.engine.close()
    assert due.signals[-1] == signal.SIGKILL
    assert signal.SIGKILL not in early.signals
    cancelled = next(d for d in r.sink.decisions if d.pid == 43 and d.outcome == "skipped")
    assert cancelled.reason == "agent stopping: SIGKILL cancelled with 1.5 s of its 2 s grace left"
    assert (early.open_pins, due.open_pins) == (0, 0)


def test_a_dry_run_terminate_starts_no_timer(tmp_path: Path) -> None:
    stubborn = FakeProcess(ignores_term=True)
    r = _rig(tmp_path, {42: stubborn})
    r.engine.dry_run = True
    r.engine.on_record(_record(42))
    assert r.lines() == [(42, "would-act", "terminate")]
    assert stubborn.signals == [] and len(r.executor.timers) == 0


def test_a_notify_step_starts_no_timer(tmp_path: Path) -> None:
    # Only terminate goes through the timers; every other action runs as before.
    r = _rig(tmp_path, {})
    step = Step("notify", NotifyParams(message="hi"))
    subject = Subject(7, 1, "x", 1, None, 0, False, "/a", "/a", handle=FakeProcess(True).pin())
    assert r.executor.execute(step, subject, _policy("hogs", "end")) == "hi"
    assert len(r.executor.timers) == 0


def test_a_refused_sigkill_is_audited_and_lets_go_of_its_pins(tmp_path: Path) -> None:
    refuses = FakeProcess(ignores_term=True, denies_kill=True)
    r = _rig(tmp_path, {42: refuses})
    r.engine.on_record(_record(42))
    r.clock.advance(GRACE_S)
    r.engine.tick()
    line = r.sink.decisions[-1]
    assert (line.outcome, line.action) == ("denied", "terminate")
    assert "no SIGKILL" in line.message
    assert len(r.executor.timers) == 0
    r.engine.close()
    assert refuses.open_pins == 0
