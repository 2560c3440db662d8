"""A step whose executor raises something other than ActionError (a full undo journal) after
its intent: the intent is answered and the offender's next record is decided."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_audit_writeahead import _engine, _next_step
from test_engine import PLAYBOOK, record

from remedy.actions.journal import JournalError
from remedy.actions.params import KillParams, QuarantineParams
from remedy.policy import Step
from remedy.service.audit import AuditLog
from remedy.tools.auditquery import check


@pytest.mark.parametrize(
    "step",
    [Step("kill", KillParams()), Step("quarantine", QuarantineParams())],
    ids=["kill", "quarantine"],
)
def test_a_non_action_error_answers_its_intent_and_the_offender_is_decided_again(
    tmp_path: Path, step: Step
) -> None:
    path = tmp_path / "audit.jsonl"
    engine, executor, seen, clock = _engine(
        AuditLog(path), playbook=replace(PLAYBOOK, steps=(step,))
    )
    executor.fail_with = JournalError("cannot write undo journal: No space left on device")
    with pytest.raises(JournalError):  # the agent's _decide contains and counts it
        engine.on_record(record(42))
    assert check(path).unfinished == ()  # a live agent: no unanswered intent
    executor.fail_with = None
    _next_step(engine, clock)  # before: MachineError "Can't trigger event suspect"
    assert executor.ran == [(step.action, 42)]
    assert [d.outcome for d in seen.decisions] == ["error", "acted"]
