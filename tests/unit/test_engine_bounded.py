"""The engine's offender table is bounded (issue 11, item 4): a cap on offenders and on the
pidfds they hold, LRU eviction of idle ones only, refusal (audited, never a crash) when
nothing may be evicted, and per-record work that does not grow with the number tracked."""

from __future__ import annotations

import gc
import resource
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from remedy.actions.params import FreezeParams
from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import SWEEP_MIN, SWEEP_PERIOD_S, Engine, handle_budget
from remedy.engine.guards import Protector
from remedy.engine.offender import Offender, Subject, attach, detach, fire, new_machine
from remedy.policy import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.sensors.records import SensorRecord

PLAYBOOK = Playbook(
    name="freeze", file=Path("playbooks/freeze.yaml"), steps=(Step("freeze", FreezeParams()),)
)
# One action an hour: in a storm, the first offender is acted on and every later one is held
# by the rate limit, so it stays observed with nothing applied (idle, evictable).
POLICY = Policy(
    name="fork-bomb",
    file=Path("policies/fork-bomb.yaml"),
    signal="fork_rate",
    threshold=200,
    window_s=1.0,
    playbook="freeze",
    dry_run=False,
    cooldown_s=2.0,
    release_after_s=600.0,
    rate_limit=RateLimit(max_actions=1, per_s=3600.0),
    match=Selector(),
)


@dataclass
class Handle:
    closed: bool = False
    exited: bool = False
    polled: int = 0  # has_exited() calls: what a tick's sweep costs, one per offender looked at

    def has_exited(self) -> bool:
        self.polled += 1
        return self.exited

    def send_signal(self, sig: int) -> None:
        raise AssertionError("no signal is sent in these tests")

    def close(self) -> None:
        self.closed = True


@dataclass
class Identifier:
    """Every pid is a live process; each identification opens a new handle (a pidfd)."""

    handles: list[Handle] = field(default_factory=list)

    def identify(self, record: SensorRecord) -> Subject:
        handle = Handle()
        self.handles.append(handle)
        pid = record.tgid
        return Subject(pid, 1000 + pid, "forker", 1, None, 0, False, "/a", "/cg/a", handle=handle)

    def open(self) -> int:
        return sum(not h.closed for h in self.handles)


@dataclass
class Undo:
    """The journal's view: a freeze that ran is live until the offender is reverted."""

    live: set[tuple[int, int]] = field(default_factory=set)

    def revert_offender(self, subject: Subject, reason: str) -> list[str]:
        self.live.discard(subject.key)
        return []

    def revert_policy(self, policy: str, reason: str) -> list[str]:
        return []

    def expire(self) -> list[str]:
        return []

    def revert_all(self, reason: str) -> list[str]:
        self.live.clear()
        return []


@dataclass
class Executor:
    undo: Undo
    ran: list[int] = field(default_factory=list)

    def describe(self, step: Step, subject: Subject) -> str:
        return "freeze"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        self.ran.append(subject.pid)
        self.undo.live.add(subject.key)
        return ""

    def release(self, subject: Subject) -> None:
        pass


@dataclass
class Sink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


@dataclass
class Rig:
    engine: Engine
    clock: FakeClock
    identifier: Identifier
    undo: Undo
    executor: Executor
    sink: Sink

    def feed(self, pid: int) -> None:
        self.engine.on_record(SensorRecord("fork_rate", pid, pid, 1, "forker", 1, 500, 1.0, 0, 0))

    def tracked(self) -> set[int]:
        return {o.subject.pid for o in self.engine.offenders()}


def rig(policy: Policy = POLICY, *, dry_run: bool = False, **caps: Any) -> Rig:
    clock, identifier, undo, sink = FakeClock(), Identifier(), Undo(), Sink()
    executor = Executor(undo)
    engine = Engine(
        PolicySet((policy,), {PLAYBOOK.name: PLAYBOOK}),
        identifier=identifier,
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(999_999_999, frozenset({1})),
        dry_run=dry_run,
        undo=undo,
        **caps,
    )
    return Rig(engine, clock, identifier, undo, executor, sink)


def test_a_storm_of_distinct_offenders_stays_within_the_cap_and_never_evicts_a_live_change() -> (
    None
):
    r = rig(max_offenders=1_000, max_handles=1_000)
    r.feed(7)  # acted on: its freeze is live in the journal
    assert r.executor.ran == [7] and r.undo.live == {(7, 1007)}
    r.clock.advance(3.0)
    r.engine.tick()  # out of cooldown: observed, idle-looking, but with a live change
    assert [o.state for o in r.engine.offenders()] == ["observed"]
    for n in range(20_000):
        r.feed(100 + n)
        # Checked on every record, not only at the end: the bound holds throughout.
        if n % 997 == 0:
            assert len(r.tracked()) <= 1_000
            assert r.identifier.open() <= 1_000
    assert len(r.tracked()) == 1_000
    assert r.identifier.open() == 1_000  # one pidfd per tracked process, the evicted closed
    assert 7 in r.tracked()  # never evicted: its change is live
    assert not r.identifier.handles[0].closed
    assert r.engine.stats["offenders-evicted"] == 20_001 - 1_000
    assert r.engine.stats["offenders-refused"] == 0
    # Least recently seen first: the newest 999 remain beside pid 7.
    assert r.tracked() == {7, *range(100 + 20_000 - 999, 100 + 20_000)}


def test_the_least_recently_seen_idle_offender_is_the_one_evicted() -> None:
    r = rig(max_offenders=4)
    r.feed(7)  # acted on; stays in cooldown (the clock does not move)
    for pid in (10, 11, 12):
        r.feed(pid)
    r.feed(10)  # seen again: now the most recent
    r.feed(13)
    assert r.tracked() == {7, 10, 12, 13}
    r.feed(14)
    assert r.tracked() == {7, 10, 13, 14}
    r.feed(15)
    assert r.tracked() == {7, 13, 14, 15}  # 10's record made it recent, not immune


@pytest.mark.parametrize("dry_run", [False, True], ids=["applied", "dry-run-cooldown"])
def test_a_table_full_of_offenders_that_may_not_be_evicted_refuses_and_audits(
    dry_run: bool,
) -> None:
    """Enforcing: each has a live change. Dry-run: each is in cooldown. Neither is evicted;
    the new record is skipped with a reason that says why, and its pidfd is closed."""
    r = rig(replace(POLICY, rate_limit=RateLimit(100, 1.0)), dry_run=dry_run, max_offenders=5)
    for pid in range(10, 15):
        r.feed(pid)
    assert [d.outcome for d in r.sink.decisions] == ["would-act" if dry_run else "acted"] * 5
    r.feed(99)
    assert r.tracked() == {10, 11, 12, 13, 14}
    last = r.sink.decisions[-1]
    assert (last.outcome, last.pid) == ("skipped", 99)
    assert "offender table full" in last.reason and "none idle to evict" in last.reason
    assert r.engine.stats["offenders-refused"] == 1
    assert r.engine.stats["offenders-evicted"] == 0
    assert r.identifier.handles[-1].closed  # the refused record's pidfd is not leaked
    assert r.identifier.open() == 5
    assert r.executor.ran == ([] if dry_run else [10, 11, 12, 13, 14])


def test_released_offenders_free_their_place() -> None:
    r = rig(replace(POLICY, rate_limit=RateLimit(100, 1.0), release_after_s=5.0), max_offenders=3)
    for pid in (10, 11, 12):
        r.feed(pid)
    r.feed(13)
    assert r.engine.stats["offenders-refused"] == 1
    r.clock.advance(10.0)
    r.engine.tick()  # quiet past release_after: released and reverted
    assert r.tracked() == set() and r.undo.live == set()
    r.feed(13)
    assert r.tracked() == {13}


def test_pidfds_are_capped_below_the_offender_cap() -> None:
    r = rig(max_offenders=1_000, max_handles=50)
    for pid in range(10, 2_010):
        r.feed(pid)
    assert r.identifier.open() <= 50
    assert len(r.tracked()) <= 50


def test_the_default_pidfd_cap_is_well_under_the_fd_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    engine = rig().engine
    assert engine.max_offenders == 10_000
    assert engine.max_handles <= min(10_000, soft // 2)
    # Started by hand with the usual soft limit of 1,024: EMFILE came at about 1,000 pidfds.
    assert handle_budget(10_000, 1_024) == 512
    assert handle_budget(10_000, 65_536) == 10_000
    assert handle_budget(100, resource.RLIM_INFINITY) == 100


@contextmanager
def counting() -> Iterator[list[int]]:
    """Count the Python lines run (a loop's every pass is a line event): work, not time."""
    count = [0]

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        count[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        yield count
    finally:
        sys.settrace(None)


def test_the_work_per_record_does_not_grow_with_the_offenders_tracked() -> None:
    r = rig(max_offenders=50_000, max_handles=50_000)

    def work_for_a_new_offender(pid: int) -> int:
        with counting() as count:
            r.feed(pid)
        return count[0]

    pid = 10
    samples: dict[int, int] = {}
    for size in (200, 10_000):
        while pid - 10 < size:  # each new pid is one more offender (nothing is evicted)
            r.feed(pid)
            pid += 1
        assert len(r.tracked()) == size
        samples[size] = work_for_a_new_offender(pid)
        pid += 1
    # A scan of every offender (or of transitions' model list) is thousands of lines at 10,000.
    assert samples[10_000] <= samples[200] + 20, samples
    assert r.engine.stats["offenders-evicted"] == 0


class _Comparing(Offender):
    """An offender that counts how often something compares it to another."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _Comparing.compared += 1
        return self is other

    __hash__ = object.__hash__


def test_the_state_machine_attaches_and_detaches_without_scanning_its_models() -> None:
    """transitions keeps models in a list and tests membership on add_model and remove_model:
    one comparison per model already attached, for every offender made or released."""
    machine = new_machine()
    who = Subject(1, 1, "x", 0, None, 0, False, "/", "/")
    offenders = [_Comparing(who, f"p{i}", 0.0, 0.0) for i in range(500)]
    _Comparing.compared = 0
    for offender in offenders:
        attach(machine, offender)
    fire(offenders[-1], "suspect")
    assert offenders[-1].state == "suspect" and offenders[0].state == "observed"
    for offender in offenders:
        detach(machine, offender)
    assert _Comparing.compared == 0


def test_an_evicted_offender_is_freed_at_once_not_by_a_later_full_collection() -> None:
    """transitions' bound triggers make each offender a reference cycle; left for the cyclic
    GC, evicted offenders pile up and every full collection scans them all."""
    r = rig(max_offenders=2)
    r.feed(7)  # acted on: stays
    r.feed(10)  # held by the rate limit: idle
    [idle] = [o for o in r.engine.offenders() if o.subject.pid == 10]
    ref = weakref.ref(idle)
    del idle
    gc.disable()
    try:
        r.feed(11)  # evicts 10
        assert r.tracked() == {7, 11}
        assert ref() is None
    finally:
        gc.enable()


def _polled(r: Rig) -> int:
    return sum(h.polled for h in r.identifier.handles)


def test_a_tick_looks_at_a_bounded_slice_and_still_sweeps_everyone_within_a_second() -> None:
    """The agent ticks after every record: a tick that polled every offender's pidfd made the
    cost per record O(offenders) again."""
    r = rig(max_offenders=5_000, max_handles=5_000)
    for pid in range(10, 5_010):
        r.feed(pid)
    r.engine.tick()  # the first tick is a full pass
    before = _polled(r)
    r.clock.advance(0.001)
    r.engine.tick()
    assert _polled(r) - before == SWEEP_MIN  # 1 ms of a 1 s pass of 5,000 is 5: the floor wins
    # One of them exits: released within one sweep period of ticks, however many are tracked.
    [gone] = [h for h in r.identifier.handles if not h.closed][2_500:2_501]
    gone.exited = True
    for _ in range(10):
        r.clock.advance(SWEEP_PERIOD_S / 10)
        r.engine.tick()
    assert gone.closed
    assert len(r.tracked()) == 4_999


def test_few_offenders_are_all_swept_on_every_tick() -> None:
    r = rig()
    for pid in range(10, 10 + SWEEP_MIN):
        r.feed(pid)
    r.engine.tick()
    r.engine.tick()  # no time passed: still every one of them, as before the slices
    assert [h.polled for h in r.identifier.handles] == [2] * SWEEP_MIN
