"""The engine on recorded records, a fake clock and fake actuators: no root, no kernel."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from remedy.actions.params import (
    FreezeParams,
    KillParams,
    LimitPidsParams,
    NotifyParams,
    QuarantineParams,
    StopParams,
    TerminateParams,
)
from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import PermissionDenied, ProcessGone
from remedy.policy import Breaker, Playbook, Policy, PolicySet, RateLimit, Selector, Silence, Step
from remedy.sensors.catalog import SignalCounters
from remedy.sensors.records import SensorRecord
from testkit.plans import Filter, plan_of

POLICY = Policy(
    name="fork-bomb",
    file=Path("policies/fork-bomb.yaml"),
    signal="fork_rate",
    threshold=200,
    window_s=1.0,
    playbook="contain",
    dry_run=False,
    cooldown_s=2.0,
    release_after_s=10.0,
    rate_limit=RateLimit(max_actions=3, per_s=60.0),
    match=Selector(),
)
PLAYBOOK = Playbook(
    name="contain",
    file=Path("playbooks/contain.yaml"),
    steps=(Step("quarantine", QuarantineParams()), Step("kill", KillParams())),
)


@dataclass
class FakeHandle:
    exited: bool = False
    closed: bool = False

    def has_exited(self) -> bool:
        return self.exited

    def send_signal(self, sig: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeIdentifier:
    """Knows a fixed table of processes; anything else is gone."""

    table: dict[int, Subject]
    handles: list[FakeHandle] = field(default_factory=list)

    def identify(self, record: SensorRecord) -> Subject:
        subject = self.table.get(record.tgid)
        if subject is None:
            raise ProcessGone("exited", pid=record.tgid)
        handle = FakeHandle()
        self.handles.append(handle)
        return replace(subject, handle=handle)


@dataclass
class FakeExecutor:
    ran: list[tuple[str, int]] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    fail_with: Exception | None = None

    def describe(self, step: Step, subject: Subject) -> str:
        return f"into /q-{subject.pid}"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.ran.append((step.action, subject.pid))
        return ""

    def release(self, subject: Subject) -> None:
        self.released.append(subject.pid)


@dataclass
class ListSink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


def subject(pid: int, **kw: object) -> Subject:
    base = Subject(pid, 1000 + pid, "forker", 1, "/usr/bin/forker", 0, False, "/a", "/cg/a")
    return replace(base, **kw)  # type: ignore[arg-type]


def record(pid: int, count: int = 200) -> SensorRecord:
    return SensorRecord("fork_rate", pid, pid, 1, "forker", 1, count, 1.0, 0.2, 0)


@dataclass
class Rig:
    engine: Engine
    clock: FakeClock
    executor: FakeExecutor
    sink: ListSink
    identifier: FakeIdentifier

    def outcomes(self) -> list[tuple[str, str | None]]:
        return [(d.outcome, d.action) for d in self.sink.decisions]


def rig(
    *subjects: Subject,
    policy: Policy = POLICY,
    dry_run: bool = False,
    agent_pid: int = 999,
    playbook: Playbook = PLAYBOOK,
) -> Rig:
    clock = FakeClock()
    executor = FakeExecutor()
    sink = ListSink()
    identifier = FakeIdentifier({s.pid: s for s in subjects})
    engine = Engine(
        PolicySet((policy,), {playbook.name: playbook}),
        identifier=identifier,
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(agent_pid, frozenset({1, 998})),
        dry_run=dry_run,
    )
    return Rig(engine, clock, executor, sink, identifier)


def test_acts_then_cools_down_then_escalates() -> None:
    r = rig(subject(42))
    r.engine.on_record(record(42))
    r.clock.advance(1.0)
    r.engine.on_record(record(42))  # inside the cooldown: sensed, but no audit line
    r.clock.advance(1.5)
    r.engine.tick()
    r.engine.on_record(record(42))
    # One line per step of the ladder, not one per window (no "skipped (cooldown…)").
    assert r.outcomes() == [("acted", "quarantine"), ("acted", "kill")]
    assert r.executor.ran == [("quarantine", 42), ("kill", 42)]
    assert r.engine.stats["records-in-cooldown"] == 1


def test_dry_run_walks_the_same_path_without_side_effects() -> None:
    r = rig(subject(42), dry_run=True)
    r.engine.on_record(record(42))
    r.clock.advance(3.0)
    r.engine.tick()
    r.engine.on_record(record(42))
    assert r.outcomes() == [("would-act", "quarantine"), ("would-act", "kill")]
    assert r.executor.ran == []
    assert all(d.dry_run for d in r.sink.decisions)
    assert r.sink.decisions[0].message.startswith("would quarantine pid 42")


def test_policy_dry_run_is_honoured_and_global_dry_run_overrides_enforcing_policies() -> None:
    r = rig(subject(42), policy=replace(POLICY, dry_run=True))
    r.engine.on_record(record(42))
    assert r.outcomes() == [("would-act", "quarantine")]


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        (subject(1), "pid 1"),
        (subject(50, is_kernel_thread=True), "kernel thread"),
        (subject(999), "the agent"),
        (subject(998), "ancestor"),
        (subject(51, exe="/usr/sbin/sshd"), "protected executable"),
    ],
)
def test_protected_processes_are_skipped(who: Subject, reason: str) -> None:
    r = rig(who)
    r.engine.on_record(record(who.pid))
    assert r.outcomes() == [("skipped", "quarantine")]
    assert reason in r.sink.decisions[0].reason
    assert r.executor.ran == []


def test_substring_of_a_protected_exe_is_not_protected() -> None:
    r = rig(subject(52, exe="/tmp/usr/sbin/sshd"))
    r.engine.on_record(record(52))
    assert r.outcomes() == [("acted", "quarantine")]


def test_rate_limit_is_per_policy_and_audited() -> None:
    r = rig(*(subject(p) for p in range(10, 15)))
    for pid in range(10, 15):
        r.engine.on_record(record(pid))
    assert [o for o, _ in r.outcomes()] == ["acted"] * 3 + ["skipped"] * 2
    assert "rate limit" in r.sink.decisions[-1].reason
    r.clock.advance(61)
    r.engine.tick()
    r.engine.on_record(record(14))
    assert r.outcomes()[-1] == ("acted", "quarantine")


def test_a_process_that_exited_before_identification_is_not_a_decision() -> None:
    r = rig()
    r.engine.on_record(record(77))
    assert r.sink.decisions == []
    assert r.engine.stats["identify-gone"] == 1


def test_failed_action_is_audited_with_its_outcome_and_retried_later() -> None:
    r = rig(subject(42))
    r.executor.fail_with = PermissionDenied("no", pid=42)
    r.engine.on_record(record(42))
    r.executor.fail_with = None
    r.engine.on_record(record(42))
    assert r.outcomes() == [("denied", "quarantine"), ("acted", "quarantine")]


def test_quiet_offenders_are_released_and_their_pidfds_closed() -> None:
    r = rig(subject(42))
    r.engine.on_record(record(42))
    r.clock.advance(2.0)
    r.engine.tick()
    assert [o.state for o in r.engine.offenders()] == ["observed"]
    r.clock.advance(10.0)
    r.engine.tick()
    assert list(r.engine.offenders()) == []
    assert r.executor.released == [42]
    assert all(h.closed for h in r.identifier.handles)


def test_an_exited_offender_is_released_at_once() -> None:
    r = rig(subject(42))
    r.engine.on_record(record(42))
    r.identifier.handles[0].exited = True
    r.engine.tick()
    assert list(r.engine.offenders()) == []


def test_a_reused_pid_is_a_new_offender() -> None:
    r = rig(subject(42))
    r.engine.on_record(record(42))
    r.identifier.table[42] = subject(42, start_ticks=99999)
    r.engine.on_record(record(42))
    assert r.outcomes() == [("acted", "quarantine"), ("acted", "quarantine")]
    assert len(list(r.engine.offenders())) == 2


def test_selector_limits_which_cgroups_are_acted_on() -> None:
    policy = replace(POLICY, match=Selector(cgroups=("/other/*",)))
    r = rig(subject(42), policy=policy)
    r.engine.on_record(record(42))
    assert r.sink.decisions == []
    assert r.engine.stats["unmatched"] == 1
    assert r.identifier.handles[0].closed


def test_close_releases_everything() -> None:
    r = rig(subject(42), subject(43))
    r.engine.on_record(record(42))
    r.engine.on_record(record(43))
    r.engine.close()
    assert list(r.engine.offenders()) == []
    assert sorted(r.executor.released) == [42, 43]


def test_a_degraded_window_never_escalates_to_a_kill() -> None:
    r = rig(subject(42))
    r.engine.on_record(replace(record(42), degraded=True))  # quarantine is reversible: allowed
    r.clock.advance(3.0)
    r.engine.tick()
    r.engine.on_record(replace(record(42), degraded=True))
    assert r.outcomes() == [("acted", "quarantine"), ("skipped", "kill")]
    assert "degraded" in r.sink.decisions[-1].reason
    assert r.executor.ran == [("quarantine", 42)]
    r.engine.on_record(record(42))  # a clean window may escalate
    assert r.outcomes()[-1] == ("acted", "kill")


# -- issue 4: guard rails, precedence, reload ---------------------------------------------


def _set(*policies: Policy, **kw: object) -> PolicySet:
    return PolicySet(policies, {PLAYBOOK.name: PLAYBOOK}, **kw)  # type: ignore[arg-type]


def rig_set(policy_set: PolicySet, *subjects: Subject) -> Rig:
    r = rig(*subjects)
    r.engine.reload(policy_set)
    return r


def test_breaker_demotes_a_policy_acting_on_too_many_offenders_and_alerts() -> None:
    policy = replace(
        POLICY, breaker=Breaker(max_offenders=2, per_s=600.0), rate_limit=RateLimit(100, 60.0)
    )
    r = rig_set(_set(policy), *(subject(p, exe=f"/bin/w{p}") for p in range(10, 14)))
    for pid in range(10, 14):
        r.engine.on_record(record(pid))
    assert r.outcomes() == [
        ("acted", "quarantine"),
        ("acted", "quarantine"),
        ("breaker-tripped", "quarantine"),
        ("would-act", "quarantine"),
        ("would-act", "quarantine"),
    ]
    assert "3 distinct offenders" in r.sink.decisions[2].reason
    assert "demoted to monitor" in r.sink.decisions[-1].reason
    assert r.executor.ran == [("quarantine", 10), ("quarantine", 11)]
    assert r.engine.stats["breaker-tripped"] == 1
    r.engine.reload(_set(policy))  # an operator reloads: the policy enforces again
    r.clock.advance(3.0)
    r.engine.tick()
    r.engine.on_record(record(10))
    assert r.outcomes()[-1] == ("acted", "kill")


def test_silences_suppress_actions_until_they_expire() -> None:
    r = rig(subject(42))
    silence = Silence(
        name="maintenance",
        file=Path("s.yaml"),
        match=Selector(comms=("forker",)),
        author="alice",
        reason="load test",
        expires=r.clock.wall() + 100,
    )
    r.engine.reload(_set(POLICY, silences=(silence,)))
    r.engine.on_record(record(42))
    assert r.outcomes() == [("skipped", "quarantine")]
    assert r.sink.decisions[0].reason.startswith("silenced by alice until ")
    assert r.sink.decisions[0].reason.endswith(": load test")
    r.clock.advance(101)
    r.engine.tick()
    r.engine.on_record(record(42))  # still sensed; the expired silence no longer applies
    assert r.outcomes()[-1] == ("acted", "quarantine")


def test_protected_processes_are_never_acted_on_even_when_a_policy_names_them() -> None:
    sshd = replace(POLICY, match=Selector(exes=("/usr/sbin/sshd",)))
    r = rig_set(_set(sshd), subject(42, exe="/usr/sbin/sshd"))
    r.engine.on_record(record(42))
    assert r.outcomes() == [("skipped", "quarantine")]
    assert "protected executable" in r.sink.decisions[0].reason


def test_the_protected_set_is_extended_by_configuration() -> None:
    r = rig_set(
        _set(POLICY, protected_exes=frozenset({"/opt/db/bin/db"})),
        subject(42, exe="/opt/db/bin/db"),
        subject(43, exe="/opt/db/bin/db-tool"),
    )
    r.engine.on_record(record(42))
    r.engine.on_record(record(43))
    assert r.outcomes() == [("skipped", "quarantine"), ("acted", "quarantine")]


def test_exclude_wins_over_match() -> None:
    policy = replace(POLICY, exclude=Selector(comms=("forker",)))
    r = rig_set(_set(policy), subject(42))
    r.engine.on_record(record(42))
    assert r.sink.decisions == []
    assert r.engine.stats["unmatched"] == 1


def test_precedence_one_policy_remediates_a_process_and_higher_severity_takes_over() -> None:
    cpu = replace(POLICY, name="cpu-hog", signal="cpu", severity="critical")
    fork = replace(POLICY, severity="warning")
    r = rig_set(_set(fork, cpu), subject(42))
    r.engine.on_record(replace(record(42), signal="cpu"))  # critical acts first
    r.engine.on_record(record(42))  # warning: the critical policy is remediating
    assert r.outcomes() == [("acted", "quarantine"), ("skipped", "quarantine")]
    assert r.sink.decisions[1].reason == "another policy is remediating: cpu-hog"

    r2 = rig_set(_set(fork, cpu), subject(42))
    r2.engine.on_record(record(42))  # warning acts first
    r2.engine.on_record(replace(record(42), signal="cpu"))  # critical takes over
    assert r2.outcomes() == [("acted", "quarantine"), ("acted", "quarantine")]
    assert len(r2.identifier.handles) == 2
    assert r2.identifier.handles[1].closed  # the second identification reused the first pidfd


def test_reload_keeps_offender_state_and_releases_removed_policies() -> None:
    r = rig(subject(42))
    r.engine.on_record(record(42))  # quarantine; cooldown 2 s; next step is kill
    r.engine.reload(_set(replace(POLICY, threshold=150)))
    [offender] = r.engine.offenders()
    assert (offender.state, offender.step) == ("cooldown", 1)
    r.clock.advance(2.5)
    r.engine.tick()
    r.engine.on_record(record(42))
    assert r.outcomes()[-1] == ("acted", "kill")
    other = replace(POLICY, name="other")
    r.engine.reload(_set(other))
    assert list(r.engine.offenders()) == []
    assert r.executor.released == [42]


def test_states_walk_suspect_offending_remediating_cooldown() -> None:
    seen: list[str] = []

    class Spy(FakeExecutor):
        def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
            seen.append(next(iter(r.engine.offenders())).state)
            return super().execute(step, subject, policy)

    r = rig(subject(42))
    r.engine._executor = Spy()
    r.engine.on_record(record(42))
    assert seen == ["remediating"]
    assert next(iter(r.engine.offenders())).state == "cooldown"


# -- issue 5: settle, until, undo --------------------------------------------------------


@dataclass
class FakeUndo:
    calls: list[tuple[str, str]] = field(default_factory=list)

    def revert_offender(self, subject: Subject, reason: str) -> list[str]:
        self.calls.append(("offender", reason))
        return [f"restored pid {subject.pid}"]

    def revert_policy(self, policy: str, reason: str) -> list[str]:
        self.calls.append(("policy", policy))
        return []

    def expire(self) -> list[str]:
        self.calls.append(("expire", ""))
        return []

    def revert_all(self, reason: str) -> list[str]:
        self.calls.append(("all", reason))
        return []


@dataclass
class FixedSensor:
    """Every window measures ``value``; holds are recorded."""

    value: int | None
    calls: list[tuple[str, int]] = field(default_factory=list)

    def measure(self, record: SensorRecord) -> int | None:
        return self.value

    def hold(self, record: SensorRecord) -> None:
        self.calls.append(("hold", record.rule))

    def unhold(self, record: SensorRecord) -> None:
        self.calls.append(("unhold", record.rule))


SETTLING = Playbook(
    name="contain",
    file=Path("playbooks/contain.yaml"),
    steps=(
        Step("quarantine", QuarantineParams(), settle_s=1.0, until_below=50),
        Step("kill", KillParams()),
    ),
)


def settling_rig(value: int | None, *, keep: bool = False) -> tuple[Rig, FakeUndo]:
    clock = FakeClock()
    executor, sink, undo = FakeExecutor(), ListSink(), FakeUndo()
    identifier = FakeIdentifier({42: subject(42)})
    engine = Engine(
        PolicySet((replace(POLICY, cooldown_s=0.5),), {SETTLING.name: SETTLING}),
        identifier=identifier,
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(999, frozenset({1})),
        sensor=FixedSensor(value),
        undo=undo,
        keep_on_close=keep,
    )
    return Rig(engine, clock, executor, sink, identifier), undo


def test_a_step_that_did_not_help_escalates_after_settling_without_waiting_for_a_record() -> None:
    r, _ = settling_rig(value=180)
    r.engine.on_record(record(42))
    r.clock.advance(0.9)
    r.engine.tick()
    assert r.executor.ran == [("quarantine", 42)]  # still settling
    r.clock.advance(0.2)
    r.engine.tick()
    assert r.executor.ran == [("quarantine", 42), ("kill", 42)]
    assert r.sink.decisions[-1].count == 180  # the re-measured value


def test_an_offender_that_recovers_is_reverted_and_starts_over() -> None:
    r, undo = settling_rig(value=10)
    r.engine.on_record(record(42))
    r.clock.advance(1.1)
    r.engine.tick()
    assert r.outcomes() == [("acted", "quarantine"), ("recovered", "quarantine")]
    assert ("offender", "recovered") in undo.calls
    assert "restored pid 42" in r.sink.decisions[-1].message
    [offender] = r.engine.offenders()
    assert (offender.state, offender.step) == ("observed", 0)
    r.clock.advance(20)
    r.engine.tick()
    assert list(r.engine.offenders()) == []


def test_undo_on_ttl_policy_removal_and_shutdown() -> None:
    r, undo = settling_rig(value=None)
    r.engine.tick()
    assert ("expire", "") in undo.calls
    r.engine.reload(PolicySet((replace(POLICY, name="other"),), {SETTLING.name: SETTLING}))
    assert ("policy", "fork-bomb") in undo.calls
    r.engine.close()
    assert ("all", "agent shutdown") in undo.calls
    kept, undo2 = settling_rig(value=None, keep=True)
    kept.engine.close()
    assert not [c for c in undo2.calls if c[0] == "all"]


def test_a_released_offender_is_reverted_unless_changes_are_kept_on_shutdown() -> None:
    r, undo = settling_rig(value=None)
    r.engine.on_record(record(42))
    for _ in range(3):  # settle, escalate, cool down, then quiet past release_after
        r.clock.advance(30)
        r.engine.tick()
    assert list(r.engine.offenders()) == []
    assert ("offender", "released") in undo.calls
    kept, undo2 = settling_rig(value=None, keep=True)
    kept.engine.on_record(record(42))
    kept.engine.close()
    assert not [c for c in undo2.calls if c[0] in ("offender", "all")]


# -- issue 10 item 8: degraded data never ends a process ---------------------------------------


def ladder(*steps: Step) -> Playbook:
    return Playbook(name="contain", file=Path("playbooks/contain.yaml"), steps=steps)


def degraded(pid: int) -> SensorRecord:
    return replace(record(pid), degraded=True)


ENDS_A_PROCESS = [
    pytest.param(Step("kill", KillParams()), id="kill"),
    pytest.param(Step("kill", KillParams(signal="SIGTERM", quarantine=False)), id="kill-sigterm"),
    pytest.param(Step("kill", KillParams(), scope="cgroup", scope_set=True), id="cgroup-kill"),
    pytest.param(Step("terminate", TerminateParams(grace_s=1.0)), id="terminate"),
    pytest.param(Step("kill", KillParams(), kernel=True), id="kernel-kill"),
    pytest.param(Step("stop", StopParams(), kernel=True), id="kernel-stop"),
]


@pytest.mark.parametrize("step", ENDS_A_PROCESS)
def test_degraded_data_never_ends_a_process(step: Step) -> None:
    r = rig(subject(42), playbook=ladder(step))
    r.engine.on_record(degraded(42))
    assert r.outcomes() == [("skipped", step.action)]
    assert r.sink.decisions[0].reason.startswith("degraded window: records were lost")
    assert r.executor.ran == []
    r.engine.on_record(record(42))  # a clean window may end it
    assert r.outcomes()[-1] == ("acted", step.action)


def test_degraded_data_never_kills_a_policy_scoped_cgroup() -> None:
    # The step has no scope of its own: it inherits the policy's cgroup scope (cgroup.kill).
    r = rig(
        subject(42),
        policy=replace(POLICY, scope="cgroup"),
        playbook=ladder(Step("kill", KillParams())),
    )
    r.engine.on_record(degraded(42))
    assert r.outcomes() == [("skipped", "kill")]
    assert r.executor.ran == []


def test_degraded_data_is_refused_in_dry_run_too() -> None:
    # Dry-run shows what enforcement would do: on degraded data, not a terminate.
    r = rig(subject(42), dry_run=True, playbook=ladder(Step("terminate", TerminateParams())))
    r.engine.on_record(degraded(42))
    assert r.outcomes() == [("skipped", "terminate")]


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(Step("quarantine", QuarantineParams()), id="quarantine"),
        pytest.param(Step("stop", StopParams()), id="stop"),
        pytest.param(Step("freeze", FreezeParams(), scope="cgroup", scope_set=True), id="freeze"),
        pytest.param(Step("limit_pids", LimitPidsParams(max=16), scope="tree"), id="limit_pids"),
        pytest.param(Step("notify", NotifyParams()), id="notify"),
    ],
)
def test_degraded_data_still_runs_reversible_steps(step: Step) -> None:
    r = rig(subject(42), playbook=ladder(step))
    r.engine.on_record(degraded(42))
    assert r.outcomes() == [("acted", step.action)]


def test_the_agents_loss_taint_reaches_the_guard() -> None:
    # A ring buffer loss taints the signal for two windows (LossWatch.mark, on the worker,
    # before the engine sees the record): a terminate on such a record is refused.
    from remedy.sensors.startup import LossWatch  # noqa: PLC0415

    r = rig(subject(42), playbook=ladder(Step("terminate", TerminateParams())))
    losses = LossWatch(plan_of({"fork_rate": Filter(1.0, 200)}))
    losses.update({"fork_rate": SignalCounters()}, queue_full=0, now=0.0)
    losses.update({"fork_rate": SignalCounters(ringbuf_failed=1)}, queue_full=0, now=1.0)
    r.engine.on_record(losses.mark(record(42), now=1.5))
    assert r.outcomes() == [("skipped", "terminate")]
    r.engine.on_record(losses.mark(record(42), now=3.5))  # two windows later: clean again
    assert r.outcomes()[-1] == ("acted", "terminate")


def test_a_judged_escalation_on_degraded_data_never_terminates() -> None:
    # A timed stage (stop, then terminate) escalates from tick(), judging the last record: when
    # that record was degraded, the terminate is refused; the process stays stopped (reversible).
    book = ladder(Step("stop", StopParams(), settle_s=1.0), Step("terminate", TerminateParams()))
    r = rig(subject(42), playbook=book)
    r.engine.on_record(degraded(42))
    r.clock.advance(1.1)
    r.engine.tick()
    assert r.outcomes() == [("acted", "stop"), ("skipped", "terminate")]
    assert r.executor.ran == [("stop", 42)]


# -- issue 10 item 10: precedence that cannot starve containment ---------------------------------


TELL = Playbook(
    name="tell",
    file=Path("playbooks/tell.yaml"),
    steps=(Step("notify", NotifyParams(message="crash loop"), settle_s=120.0),),
)
TELL_THEN_LIMIT = replace(
    TELL, steps=(Step("notify", NotifyParams()), Step("limit_pids", LimitPidsParams(max=16)))
)
CRASH = replace(POLICY, name="crash-loop", signal="exec_rate", playbook="tell", cooldown_s=120.0)


def exec_record(pid: int) -> SensorRecord:
    return replace(record(pid), signal="exec_rate")


def rig_books(
    policies: tuple[Policy, ...],
    books: tuple[Playbook, ...],
    *subjects: Subject,
    dry_run: bool = False,
) -> Rig:
    r = rig(*subjects, dry_run=dry_run)
    r.engine.reload(PolicySet(policies, {b.name: b for b in books}))
    return r


def test_a_notify_only_policy_of_equal_severity_never_blocks_containment() -> None:
    # Seen for real: a notify-only crash-loop policy made fork-bomb skip a ~500 forks/s process
    # 20 times ("another policy is remediating").
    r = rig_books((CRASH, POLICY), (TELL, PLAYBOOK), subject(42))
    r.engine.on_record(exec_record(42))  # notify; in cooldown for 2 minutes
    for _ in range(20):
        r.engine.on_record(replace(record(42), count=500))
        r.clock.advance(1.0)
        r.engine.tick()
    assert not [d for d in r.sink.decisions if d.reason.startswith("another policy")]
    assert r.executor.ran[:3] == [("notify", 42), ("quarantine", 42), ("kill", 42)]


def test_a_monitor_mode_policy_never_blocks_containment() -> None:
    watcher = replace(CRASH, playbook=PLAYBOOK.name, dry_run=True)  # would quarantine
    r = rig_books((watcher, POLICY), (PLAYBOOK,), subject(42))
    r.engine.on_record(exec_record(42))
    r.engine.on_record(record(42))
    assert r.outcomes() == [("would-act", "quarantine"), ("acted", "quarantine")]
    assert r.executor.ran == [("quarantine", 42)]


def test_a_policy_demoted_by_its_breaker_never_blocks_containment() -> None:
    tripping = replace(CRASH, playbook=PLAYBOOK.name, breaker=Breaker(max_offenders=1))
    r = rig_books((tripping, POLICY), (PLAYBOOK,), subject(41), subject(42))
    r.engine.on_record(exec_record(41))  # acts on its one offender
    r.engine.on_record(exec_record(42))  # a second would trip it: demoted, would-act only
    r.engine.on_record(record(42))
    assert r.outcomes() == [
        ("acted", "quarantine"),
        ("breaker-tripped", "quarantine"),
        ("would-act", "quarantine"),
        ("acted", "quarantine"),
    ]
    assert r.executor.ran == [("quarantine", 41), ("quarantine", 42)]


def test_a_policy_that_changed_the_process_still_holds_it_against_equal_severity() -> None:
    container = replace(CRASH, playbook=PLAYBOOK.name)  # enforcing quarantine: it holds
    r = rig_books((container, POLICY), (PLAYBOOK,), subject(42))
    r.engine.on_record(exec_record(42))
    r.engine.on_record(record(42))
    assert r.outcomes() == [("acted", "quarantine"), ("skipped", "quarantine")]
    assert r.sink.decisions[1].reason == "another policy is remediating: crash-loop"


def test_a_notifying_policy_holds_once_its_ladder_changes_the_process() -> None:
    crash = replace(CRASH, playbook=TELL_THEN_LIMIT.name, cooldown_s=5.0)
    r = rig_books((crash, POLICY), (TELL_THEN_LIMIT, PLAYBOOK), subject(42))
    r.engine.on_record(exec_record(42))  # notify: holds nothing
    r.engine.on_record(record(42))  # so fork-bomb contains it
    r.clock.advance(6.0)
    r.engine.tick()
    r.engine.on_record(exec_record(42))  # limit_pids changes the process: crash-loop holds it
    r.engine.on_record(record(42))
    assert r.outcomes() == [
        ("acted", "notify"),
        ("acted", "quarantine"),
        ("acted", "limit_pids"),
        ("skipped", "kill"),
    ]
    assert r.sink.decisions[-1].reason == "another policy is remediating: crash-loop"


def test_under_global_dry_run_an_enforcing_policy_holds_as_it_would_when_enforcing() -> None:
    # The audit of a --dry-run shows what enforcement would do, precedence included.
    container = replace(CRASH, playbook=PLAYBOOK.name)
    r = rig_books((container, POLICY), (PLAYBOOK,), subject(42), dry_run=True)
    r.engine.on_record(exec_record(42))
    r.engine.on_record(record(42))
    assert r.outcomes() == [("would-act", "quarantine"), ("skipped", "quarantine")]


def test_a_judged_escalation_sees_a_taint_that_came_after_the_judged_record() -> None:
    # The judged record was clean; records of the signal arriving since were tainted (a loss):
    # the escalation between records is judged on degraded data, and refused.
    book = ladder(Step("stop", StopParams(), settle_s=1.0), Step("terminate", TerminateParams()))
    r = rig(subject(42), subject(43), playbook=book)
    r.engine.on_record(record(42))
    r.clock.advance(0.5)
    r.engine.on_record(degraded(43))  # another process, same signal: stopped, not ended
    r.clock.advance(0.6)
    r.engine.tick()
    assert r.outcomes() == [("acted", "stop"), ("acted", "stop"), ("skipped", "terminate")]
    r.clock.advance(2.0)  # two windows after the loss: clean again
    r.engine.on_record(record(42))
    assert r.outcomes()[-1] == ("acted", "terminate")


def test_a_policy_that_does_not_apply_leaves_the_pidfd_to_the_next_one_on_the_signal() -> None:
    # Two policies on one signal (one kernel filter): the first does not apply and the second
    # acts, through the pidfd identification opened; it must still be open.
    elsewhere = replace(POLICY, name="elsewhere", match=Selector(cgroups=("/other/*",)))
    r = rig_set(_set(elsewhere, POLICY), subject(42))
    r.engine.on_record(record(42))
    assert r.outcomes() == [("acted", "quarantine")]
    [offender] = r.engine.offenders()
    assert offender.subject.handle is r.identifier.handles[0]
    assert not r.identifier.handles[0].closed
    r.engine.close()
    assert r.identifier.handles[0].closed


def test_a_policy_reloaded_into_monitor_mode_stops_holding_at_once() -> None:
    container = replace(CRASH, playbook=PLAYBOOK.name)
    r = rig_books((container, POLICY), (PLAYBOOK,), subject(42))
    r.engine.on_record(exec_record(42))  # quarantined by crash-loop: it holds
    r.engine.reload(PolicySet((replace(container, dry_run=True), POLICY), {"contain": PLAYBOOK}))
    r.engine.on_record(record(42))  # still in crash-loop's cooldown, but it acts no more
    assert r.outcomes() == [("acted", "quarantine"), ("acted", "quarantine")]
