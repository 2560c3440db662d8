"""Write-ahead through the engine: a step that can end a process runs only after its intent is in
the audit; while the audit cannot be written such steps are refused (`audit-unavailable`) and
reversible and dry-run decisions go on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_audit_faults import FlakyWrite
from test_engine import PLAYBOOK, POLICY, FakeExecutor, FakeIdentifier, ListSink, record, subject

from remedy.actions.params import (
    KillParams,
    LimitMemoryParams,
    QuarantineParams,
    StopParams,
    TerminateParams,
)
from remedy.clock import FakeClock
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.policy import Playbook, PolicySet, Step
from remedy.service.audit import AuditLog, FanOut
from remedy.tools.auditquery import check


def _engine(
    audit: AuditLog, *, playbook: Playbook = PLAYBOOK, dry_run: bool = False
) -> tuple[Engine, FakeExecutor, ListSink, FakeClock]:
    clock, executor, seen = FakeClock(), FakeExecutor(), ListSink()
    engine = Engine(
        PolicySet((POLICY,), {playbook.name: playbook}),
        identifier=FakeIdentifier({42: subject(42)}),
        executor=executor,
        sink=FanOut([seen, audit]),  # as the agent builds it: the audit comes last
        clock=clock,
        protector=Protector(999, frozenset({1})),
        dry_run=dry_run,
    )
    return engine, executor, seen, clock


def _next_step(engine: Engine, clock: FakeClock) -> None:
    clock.advance(3.0)  # past the cooldown
    engine.tick()
    engine.on_record(record(42))


def test_an_irreversible_step_is_refused_while_the_audit_is_unwritable(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write = FlakyWrite(full=True)
    audit = AuditLog(path, write=write)
    engine, executor, seen, clock = _engine(audit)

    engine.on_record(record(42))  # quarantine: reversible, runs although it is not audited
    assert executor.ran == [("quarantine", 42)]
    _next_step(engine, clock)  # kill: refused, the process lives
    assert executor.ran == [("quarantine", 42)]
    assert [(d.outcome, d.action) for d in seen.decisions] == [
        ("acted", "quarantine"),
        ("audit-unavailable", "kill"),
    ]
    assert "an irreversible step never runs unrecorded" in seen.decisions[-1].reason
    assert engine.stats["decision-audit-unavailable"] == 1
    assert audit.stats.refused_intents == 1
    assert path.read_bytes() == b""  # nothing half-written

    write.full = False  # space again: the next record kills, announced first
    _next_step(engine, clock)
    assert executor.ran == [("quarantine", 42), ("kill", 42)]
    lines = [json.loads(raw) for raw in path.read_bytes().splitlines()]
    assert [(e.get("event"), e.get("outcome")) for e in lines] == [
        ("audit-gap", None),
        (None, "intent"),
        (None, "acted"),
    ]
    assert lines[0]["lost_outcomes"] == {"acted": 1, "audit-unavailable": 1}
    assert lines[0]["refused_intents"] == 1
    assert lines[2]["intent"] == lines[1]["seq"]
    assert [d.outcome for d in seen.decisions][-1] == "acted"  # intents reach the audit only
    report = check(path)
    assert (report.broken, report.unfinished) == (None, ())


def test_dry_run_goes_on_while_the_audit_is_unwritable(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", write=FlakyWrite(full=True))
    engine, executor, seen, clock = _engine(audit, dry_run=True)
    engine.on_record(record(42))
    _next_step(engine, clock)
    assert [(d.outcome, d.action) for d in seen.decisions] == [
        ("would-act", "quarantine"),
        ("would-act", "kill"),
    ]
    assert executor.ran == []
    assert audit.stats.refused_intents == 0


@pytest.mark.parametrize(
    "step",
    [
        Step("kill", KillParams()),
        Step("kill", KillParams(signal="SIGTERM")),
        Step("terminate", TerminateParams()),
        Step("limit_memory", LimitMemoryParams(high=1 << 20)),  # an OOM kill below use
        Step("stop", StopParams(), kernel=True),  # the kernel arm
    ],
    ids=["kill", "kill-SIGTERM", "terminate", "limit_memory", "kernel-arm"],
)
def test_every_step_that_can_end_a_process_is_written_ahead(tmp_path: Path, step: Step) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    playbook = replace(PLAYBOOK, steps=(step,))
    engine, executor, _, _ = _engine(audit, playbook=playbook)
    engine.on_record(record(42))
    assert executor.ran == [(step.action, 42)]
    outcomes = [json.loads(raw)["outcome"] for raw in path.read_bytes().splitlines()]
    assert outcomes == ["intent", "acted"]


def test_a_reversible_step_is_not_written_ahead(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    playbook = replace(PLAYBOOK, steps=(Step("quarantine", QuarantineParams()),))
    engine, executor, _, _ = _engine(AuditLog(path), playbook=playbook)
    engine.on_record(record(42))
    assert executor.ran == [("quarantine", 42)]
    outcomes = [json.loads(raw)["outcome"] for raw in path.read_bytes().splitlines()]
    assert outcomes == ["acted"]
