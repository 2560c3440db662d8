"""Issue 12: the engine routes records by rule id through the plan of their generation, and
holds one record per incident (the sensor stops re-emitting; the engine re-measures)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from remedy.actions.params import NotifyParams, QuarantineParams, StopParams
from remedy.clock import FakeClock
from remedy.compiler import SensorPlan, compile_plan
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import ProcessGone
from remedy.policy import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.sensors.records import SensorRecord

WARN = Policy(
    name="fork-warn",
    file=Path("policies/fork-warn.yaml"),
    signal="fork_rate",
    threshold=100,
    window_s=1.0,
    playbook="tell",
    dry_run=False,
    cooldown_s=2.0,
    release_after_s=10.0,
    rate_limit=RateLimit(max_actions=10, per_s=60.0),
    match=Selector(),
    severity="warning",
)
CONTAIN = replace(WARN, name="fork-contain", threshold=500, playbook="contain", severity="critical")
TELL = Playbook("tell", Path("playbooks/tell.yaml"), (Step("notify", NotifyParams()),))
CONTAIN_BOOK = Playbook(
    "contain",
    Path("playbooks/contain.yaml"),
    (Step("stop", StopParams()), Step("quarantine", QuarantineParams())),
)
BOOKS = {TELL.name: TELL, CONTAIN_BOOK.name: CONTAIN_BOOK}


@dataclass
class Handle:
    def has_exited(self) -> bool:
        return False

    def send_signal(self, sig: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Identifier:
    def identify(self, record: SensorRecord) -> Subject:
        if record.tgid != 42:
            raise ProcessGone("exited", pid=record.tgid)
        s = Subject(42, 1042, "forker", 1, "/usr/bin/forker", 0, False, "/a", "/cg/a")
        return replace(s, handle=Handle())


@dataclass
class Executor:
    ran: list[tuple[str, str]] = field(default_factory=list)

    def describe(self, step: Step, subject: Subject) -> str:
        return step.action

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        self.ran.append((policy.name, step.action))
        return ""

    def release(self, subject: Subject) -> None:
        pass


@dataclass
class Sink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


@dataclass
class Sensor:
    """Holds and measures like the kernel: ``value`` is the current window's count."""

    value: int | None = 0
    calls: list[tuple[str, int]] = field(default_factory=list)

    def measure(self, record: SensorRecord) -> int | None:
        return self.value

    def hold(self, record: SensorRecord) -> None:
        self.calls.append(("hold", record.rule))

    def unhold(self, record: SensorRecord) -> None:
        self.calls.append(("unhold", record.rule))


@dataclass
class Rig:
    engine: Engine
    clock: FakeClock
    executor: Executor
    sink: Sink
    sensor: Sensor

    def lines(self) -> list[tuple[str, str, str | None]]:
        return [(d.policy, d.outcome, d.action) for d in self.sink.decisions]


def rig(*policies: Policy, dry_run: bool = False) -> Rig:
    clock, executor, sink, sensor = FakeClock(), Executor(), Sink(), Sensor()
    engine = Engine(
        PolicySet(policies, BOOKS),
        identifier=Identifier(),
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(999, frozenset({1})),
        dry_run=dry_run,
        sensor=sensor,
    )
    return Rig(engine, clock, executor, sink, sensor)


def crossing(plan: SensorPlan, policy: str, count: int) -> SensorRecord:
    """The record the sensor sends when pid 42 crosses ``policy``'s tier of ``plan``."""
    [(signal, _, tier)] = plan.tiers_of(policy)
    return SensorRecord(
        signal, 42, 42, 1, "forker", 1, count, 1.0, 0.2, 0, key=42,
        rule=tier.rule, generation=plan.generation,
    )  # fmt: skip


def test_two_policies_on_one_signal_each_get_only_their_tier() -> None:
    r = rig(WARN, CONTAIN)
    r.engine.on_record(crossing(r.engine.plan, "fork-warn", 150))
    # Without routing by rule, the 150/s record reached both policies and fork-contain acted.
    assert r.lines() == [("fork-warn", "acted", "notify")]
    assert r.executor.ran == [("fork-warn", "notify")]


def test_warn_at_100_contain_at_500_the_higher_severity_takes_over() -> None:
    r = rig(WARN, CONTAIN)
    plan = r.engine.plan
    r.engine.on_record(crossing(plan, "fork-warn", 100))
    r.engine.on_record(crossing(plan, "fork-contain", 500))  # same window, higher tier
    assert r.executor.ran == [("fork-warn", "notify"), ("fork-contain", "stop")]
    # The other way round: contain holds the process; the warning tier may not take it back.
    r3 = rig(WARN, CONTAIN)
    r3.engine.on_record(crossing(r3.engine.plan, "fork-contain", 600))
    r3.engine.on_record(crossing(r3.engine.plan, "fork-warn", 600))
    assert r3.executor.ran == [("fork-contain", "stop")]
    assert r3.lines()[-1][:2] == ("fork-warn", "skipped")
    assert "another policy is remediating: fork-contain" in r3.sink.decisions[-1].reason


def test_a_record_of_generation_n_routes_by_plan_n_across_reloads() -> None:
    r = rig(WARN, CONTAIN)
    first = r.engine.plan
    in_flight = crossing(first, "fork-contain", 600)
    # Reload 1 removes fork-contain; reload 2 adds fork-kill, which takes over its rule id.
    r.engine.reload(PolicySet((WARN,), BOOKS))
    kill = replace(CONTAIN, name="fork-kill", threshold=900)
    r.engine.reload(PolicySet((WARN, kill), BOOKS))
    third = r.engine.plan
    assert third.generation == first.generation + 2
    assert third.policy_of(in_flight.rule) == "fork-kill"  # the id was reused
    r.engine.on_record(in_flight)
    # Routed by the running plan, fork-kill would act on fork-contain's record.
    assert r.executor.ran == []
    [line] = r.sink.decisions
    assert (line.policy, line.outcome) == ("fork-contain", "skipped")
    assert "removed" in line.reason
    assert r.engine.stats["unroutable"] == 1
    r.engine.on_record(crossing(third, "fork-kill", 900))
    assert r.executor.ran == [("fork-kill", "stop")]


def test_a_reload_that_reorders_tiers_routes_each_record_by_its_own_plan() -> None:
    r = rig(WARN, CONTAIN)
    first = r.engine.plan
    old_warn = crossing(first, "fork-warn", 150)
    old_contain = crossing(first, "fork-contain", 600)
    # fork-contain's threshold drops below fork-warn's and the files swap order: a fresh
    # compile would give fork-warn's old slot to fork-contain; stable ids and the kept plan
    # route the old fork-warn record to fork-warn, whose tier did not change.
    r.engine.reload(PolicySet((replace(CONTAIN, threshold=50), WARN), BOOKS))
    assert compile_plan(r.engine.policies).policy_of(old_warn.rule) == "fork-contain"
    r.engine.on_record(old_warn)
    assert r.executor.ran == [("fork-warn", "notify")]
    # fork-contain's tier did change: its record from before the reload is refused, not run
    # by the policy as it is now.
    r.engine.on_record(old_contain)
    assert r.executor.ran == [("fork-warn", "notify")]
    assert r.engine.stats["unroutable"] == 1


def test_a_record_from_before_a_reload_never_meets_its_policys_new_tier() -> None:
    # A notify at 100 turned into a stricter step at 1,000 must not act on a queued 150.
    r = rig(WARN, CONTAIN)
    queued = crossing(r.engine.plan, "fork-warn", 150)
    r.engine.reload(PolicySet((replace(WARN, threshold=1000), CONTAIN), BOOKS))
    r.engine.on_record(queued)
    assert r.executor.ran == []
    assert "changed since" in r.sink.decisions[-1].reason


def test_an_unknown_rule_or_generation_is_refused_and_audited() -> None:
    r = rig(WARN, CONTAIN)
    good = crossing(r.engine.plan, "fork-contain", 600)
    for bad in (replace(good, rule=77), replace(good, generation=9), replace(good, signal="cpu")):
        r.engine.on_record(bad)
    assert r.executor.ran == []
    assert [o for _, o, _ in r.lines()] == ["skipped"] * 3
    assert all("unroutable" in d.reason for d in r.sink.decisions)
    assert r.engine.stats["unroutable"] == 3


def test_rule_0_old_traces_fall_back_to_the_policies_whose_threshold_it_reaches() -> None:
    r = rig(WARN, CONTAIN)
    old = replace(crossing(r.engine.plan, "fork-warn", 150), rule=0, generation=0)
    r.engine.on_record(old)
    # A sensor without tiers sends the lowest filter's crossing: 150 is no reason to contain.
    assert r.executor.ran == [("fork-warn", "notify")]


def test_the_sensor_holds_the_incident_while_tracked_and_unholds_on_release() -> None:
    r = rig(CONTAIN)
    rec = crossing(r.engine.plan, "fork-contain", 600)
    r.engine.on_record(rec)
    assert r.sensor.calls == [("hold", rec.rule)]
    r.sensor.value = 0  # the storm ended: measured quiet
    r.clock.advance(3.0)
    r.engine.tick()  # out of cooldown
    r.clock.advance(11.0)
    r.engine.tick()  # quiet for release_after: released
    assert list(r.engine.offenders()) == []
    assert r.sensor.calls == [("hold", rec.rule), ("unhold", rec.rule)]


def test_each_policy_holds_its_own_tier_and_releases_only_it() -> None:
    # Per tier: one policy's hold never keeps another policy's tier from emitting (a storm
    # that crossed the notify tier first must still reach the contain tier).
    r = rig(WARN, replace(CONTAIN, release_after_s=30.0))
    plan = r.engine.plan
    r.engine.on_record(crossing(plan, "fork-warn", 100))
    r.engine.on_record(crossing(plan, "fork-contain", 600))
    held = r.sensor.calls
    rules = {t.policy: t.rule for t in plan.signals["fork_rate"].slots}
    assert held == [("hold", rules["fork-warn"]), ("hold", rules["fork-contain"])]
    r.clock.advance(12.0)
    r.engine.tick()  # fork-warn released: only its tier is let go
    assert r.sensor.calls[2:] == [("unhold", rules["fork-warn"])]
    r.clock.advance(20.0)
    r.engine.tick()
    assert r.sensor.calls[3:] == [("unhold", rules["fork-contain"])]


def test_a_held_incident_escalates_by_re_measuring_not_by_records() -> None:
    r = rig(CONTAIN)
    r.engine.on_record(crossing(r.engine.plan, "fork-contain", 600))
    r.sensor.value = 700  # the storm goes on; the sensor sends nothing while it holds
    r.clock.advance(2.1)
    r.engine.tick()
    assert r.executor.ran == [("fork-contain", "stop"), ("fork-contain", "quarantine")]
    assert r.sink.decisions[-1].count == 700
    # Still offending, so not quiet: not released while the measure stays over the threshold.
    for _ in range(12):
        r.clock.advance(1.0)
        r.engine.tick()
    assert [o.policy for o in r.engine.offenders()] == ["fork-contain"]


def test_dry_run_prints_one_line_per_step_of_the_ladder_not_one_per_window() -> None:
    r = rig(CONTAIN, dry_run=True)
    plan = r.engine.plan
    r.engine.on_record(crossing(plan, "fork-contain", 600))
    r.sensor.value = 650
    for _ in range(7):  # 3.5 s of a storm: a sensor without holds sends a record a window
        r.clock.advance(0.5)
        r.engine.on_record(crossing(plan, "fork-contain", 600))
        r.engine.tick()
    assert r.lines() == [
        ("fork-contain", "would-act", "stop"),
        ("fork-contain", "would-act", "quarantine"),
    ]
    assert not any("cooldown" in d.reason for d in r.sink.decisions)
