"""A tick whose undo pass fails (a full undo journal) still ends cooldowns and releases."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, cast

import pytest
from test_engine import PLAYBOOK, POLICY, FakeExecutor, FakeIdentifier, ListSink, record, subject

from remedy.actions import journal as journal_module
from remedy.actions.journal import Journal, JournalError
from remedy.actions.undo import UndoRecord
from remedy.actions.undoer import Undoer
from remedy.clock import FakeClock
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.policy import PolicySet


class FullJournalUndo:
    """The undoer of an agent whose journal disk is full: every revert's close line fails."""

    def expire(self) -> list[str]:
        raise JournalError("cannot write undo journal: [Errno 28] No space left on device")

    def __getattr__(self, name: str) -> object:
        return lambda *a, **k: []


def test_a_failing_undo_pass_does_not_stop_cooldowns_ending() -> None:
    clock, executor, seen = FakeClock(), FakeExecutor(), ListSink()
    engine = Engine(
        PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK}),
        identifier=FakeIdentifier({42: subject(42)}),
        executor=executor,
        sink=seen,
        clock=clock,
        protector=Protector(999, frozenset({1})),
        undo=FullJournalUndo(),  # type: ignore[arg-type]
    )
    engine.on_record(record(42))
    assert executor.ran == [("quarantine", 42)]
    clock.advance(3.0)  # past the cooldown, as in test_audit_writeahead
    for _ in range(3):  # the agent contains each failure and ticks again
        with pytest.raises(JournalError):
            engine.tick()
    engine.on_record(record(42))
    # Before: the offender stays in cooldown for ever ("skipped: cooldown, -1.0 s left").
    assert [d.outcome for d in seen.decisions] == ["acted", "acted"], seen.decisions[-1].reason
    assert executor.ran == [("quarantine", 42), ("kill", 42)]


class Throttle:
    """A reversible action that remembers what it took back."""

    name = "throttle_cpu"

    def __init__(self) -> None:
        self.reverted: list[str] = []

    def undo(self, *a: object, **k: object) -> UndoRecord:
        raise AssertionError("not applied here")

    def revert(self, record: UndoRecord, ctx: object) -> str:
        self.reverted.append(record.id)
        return "cpu.max back to max"


def test_a_full_undo_journal_keeps_no_expired_throttle_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, throttle = FakeClock(), Throttle()
    actions: dict[str, Any] = {"throttle_cpu": throttle}
    undoer = Undoer(Journal(tmp_path / "undo.jsonl", clock), cast(Any, None), clock, actions)
    for i in range(3):
        undoer.journal.begin(
            UndoRecord(
                id=f"t{i}",
                action="throttle_cpu",
                policy="hog",
                pid=40 + i,
                start_ticks=7,
                cgroup=f"/a{i}",
                created=clock.wall(),
                expires=clock.wall() + 10,
            )
        )
    clock.advance(11)

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_module, "_write_all", full)
    with pytest.raises(JournalError):
        undoer.expire()
    # Before: only t2 (the newest) was taken back; t1 and t0 stayed throttled past their TTL.
    assert throttle.reverted == ["t2", "t1", "t0"]
