"""A reload whose revert of a removed policy fails (a full undo journal) leaves no offender of
that policy behind: before, every later tick raised KeyError on its name."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_engine import PLAYBOOK, POLICY, FakeExecutor, FakeIdentifier, ListSink, record, subject

from remedy.actions.journal import JournalError
from remedy.clock import FakeClock
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.policy import PolicySet


class FullJournalUndo:
    """Every revert's close line fails: the journal's disk is full."""

    def revert_policy(self, name: str, reason: str) -> list[str]:
        raise JournalError("cannot write undo journal: [Errno 28] No space left on device")

    def __getattr__(self, name: str) -> object:
        return lambda *a, **k: []


def test_a_reload_that_fails_to_revert_leaves_the_tick_working() -> None:
    clock = FakeClock()
    engine = Engine(
        PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK}),
        identifier=FakeIdentifier({42: subject(42)}),
        executor=FakeExecutor(),
        sink=ListSink(),
        clock=clock,
        protector=Protector(999, frozenset({1})),
        undo=FullJournalUndo(),  # type: ignore[arg-type]
    )
    engine.on_record(record(42))
    with pytest.raises(JournalError):  # the worker contains it
        engine.reload(PolicySet((replace(POLICY, name="other"),), {PLAYBOOK.name: PLAYBOOK}))
    clock.advance(1.0)
    engine.tick()  # before: KeyError: 'fork-bomb', on every tick
    assert engine.stats["released"] == 1
