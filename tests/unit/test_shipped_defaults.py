"""The shipped policies/ are safe to enforce on a busy server on first start (issue 10 item 11).

They are loaded with the real loader and driven through the real engine, window after window,
with fakes only for identification, actions and the clock: a root daemon started as a system
service and flooded past the fork threshold is contained but never killed; a user's fork bomb
still escalates to a kill.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from remedy.clock import FakeClock
from remedy.compiler import compile_plan
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine, facts_of
from remedy.engine.guards import Protector, ends_process
from remedy.engine.offender import Subject
from remedy.errors import ProcessGone
from remedy.policy import Policy, PolicySet, Step, load_policy_set
from remedy.sensors.records import SensorRecord

REPO = Path(__file__).resolve().parents[2]

# A pre-forking MTA as systemd starts it: parent pid 1, root, in its service's cgroup.
DAEMON = Subject(
    700, 7000, "master", 1, "/usr/lib/postfix/sbin/master", 0, False,
    "/system.slice/postfix.service", "/sys/fs/cgroup/pids/system.slice/postfix.service",
)  # fmt: skip
USER_BOMB = Subject(
    800, 8000, "bash", 799, "/usr/bin/bash", 1000, False,
    "/user.slice/user-1000.slice/session-3.scope",
    "/sys/fs/cgroup/pids/user.slice/user-1000.slice/session-3.scope",
)  # fmt: skip


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
    table: dict[int, Subject]

    def identify(self, record: SensorRecord) -> Subject:
        if record.tgid not in self.table:
            raise ProcessGone("exited", pid=record.tgid)
        return replace(self.table[record.tgid], handle=Handle())


@dataclass
class Executor:
    """Records every step the engine runs; the process never goes away, so the ladder goes on."""

    ran: list[tuple[int, Step]] = field(default_factory=list)

    def describe(self, step: Step, subject: Subject) -> str:
        return step.action

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        self.ran.append((subject.pid, step))
        return ""

    def release(self, subject: Subject) -> None:
        pass


@dataclass
class Sink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


def shipped() -> PolicySet:
    return load_policy_set([REPO / "policies"], [REPO / "playbooks"], require_secure=False)


def storm(
    who: Subject,
    *,
    dry_run: bool = False,
    windows: int = 120,
    policies: PolicySet | None = None,
    before: tuple[SensorRecord, ...] = (),
) -> tuple[Executor, Sink]:
    """``windows`` one-second windows of 500 forks each, ticking in between, as the worker does
    (after the ``before`` records)."""
    clock, executor, sink = FakeClock(), Executor(), Sink()
    engine = Engine(
        policies or shipped(),
        identifier=Identifier({who.pid: who}),
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(agent_pid=999, agent_ancestors=frozenset({1})),
        dry_run=dry_run,
    )
    for early in before:
        engine.on_record(early)
    for _ in range(windows):
        engine.on_record(
            SensorRecord("fork_rate", who.pid, who.pid, who.ppid, who.comm, 1, 500, 1.0, 0.4, 0)
        )
        clock.advance(1.0)
        engine.tick()
    engine.close()
    return executor, sink


def _ending(executor: Executor) -> list[str]:
    return [
        f"{step.action}: {ends_process(step)}" for _, step in executor.ran if ends_process(step)
    ]


def test_a_flooded_root_service_is_contained_and_never_killed() -> None:
    executor, sink = storm(DAEMON)
    assert _ending(executor) == []
    actions = [step.action for _, step in executor.ran]
    assert actions[0] == "quarantine"  # contained once, then only told about
    assert set(actions[1:]) == {"notify"}
    assert {d.policy for d in sink.decisions} == {"service-fork-storm"}
    # Nothing that could end it was even considered: no decision names such an action.
    assert {d.action for d in sink.decisions} == {"quarantine", "notify"}


def test_a_flooded_root_service_is_never_killed_in_dry_run_either() -> None:
    executor, sink = storm(DAEMON, dry_run=True)
    assert executor.ran == []
    assert {d.action for d in sink.decisions} == {"quarantine", "notify"}
    assert "would-act" in {d.outcome for d in sink.decisions}


@pytest.mark.parametrize(
    "who",
    [
        pytest.param(USER_BOMB, id="user-session"),
        # Root's own fork bomb in a login session is not a service: the full ladder.
        pytest.param(
            replace(USER_BOMB, uid=0, cgroup="/user.slice/user-0.slice/session-1.scope"),
            id="root-session",
        ),
        # A user's process in a subtree delegated to a service: the cgroup looks like a
        # service's, the uid gives it away (an unprivileged user cannot be uid 0).
        pytest.param(
            replace(USER_BOMB, cgroup="/system.slice/ci-runner.service/job-7"), id="delegated"
        ),
    ],
)
def test_a_fork_bomb_that_is_not_a_root_service_still_escalates_to_a_kill(who: Subject) -> None:
    executor, sink = storm(who)
    actions = [step.action for _, step in executor.ran]
    assert actions[:2] == ["quarantine", "kill"]
    assert {d.policy for d in sink.decisions} == {"fork-bomb"}


@pytest.mark.parametrize(
    "cgroup",
    [
        "/system.slice/postfix.service",
        "/system.slice/system-getty.slice/inetd@0.service",
        "/system.slice/exim4.service/worker",
        "/user.slice/user-1000.slice/session-3.scope",
        "/system.slice/docker-0123456789ab.scope",
        "/",
    ],
)
@pytest.mark.parametrize("uid", [0, 1000])
def test_every_process_gets_exactly_one_fork_policy(cgroup: str, uid: int) -> None:
    # fork-bomb's exclude and service-fork-storm's match are one selector: together they cover
    # every process once, so nothing forks unwatched and nothing is judged twice.
    facts = facts_of(replace(DAEMON, cgroup=cgroup, uid=uid))
    applies = [p.name for p in shipped().for_signal("fork_rate") if p.applies_to(facts) is None]
    assert len(applies) == 1, applies


def test_the_shipped_policies_of_one_signal_compile_to_tiers(tmp_path: Path) -> None:
    # Another threshold on the service policy is another tier of fork_rate, not a refusal.
    service = (REPO / "policies" / "service-fork-storm.yaml").read_text()
    (tmp_path / "service-fork-storm.yaml").write_text(service.replace("200", "300"))
    policies = load_policy_set(
        [REPO / "policies" / "fork-bomb.yaml", tmp_path], [REPO / "playbooks"],
        require_secure=False,
    )  # fmt: skip
    plan = compile_plan(policies)
    thresholds = sorted(t.threshold for t in plan.signals["fork_rate"].slots)
    assert 300 in thresholds and len(thresholds) == len(policies.for_signal("fork_rate"))


SLOW_LADDER = """\
apiVersion: remedy/v1
kind: Policy
name: exec-hog
signal: exec_rate
threshold: 50
window: 1s
playbook: slow-renice
severity: warning
---
apiVersion: remedy/v1
kind: Playbook
name: slow-renice
steps:
  - action: renice
    params: {nice: 10}
    settle: 10m
"""


def test_a_fork_bomb_is_contained_even_while_a_gentler_policy_holds_it(tmp_path: Path) -> None:
    # An operator's own warning-level policy reniced the process and settles for 10 minutes:
    # it holds the process, but the shipped fork-bomb is critical and takes over at once.
    (tmp_path / "exec-hog.yaml").write_text(SLOW_LADDER)
    policies = load_policy_set(
        [REPO / "policies", tmp_path], [REPO / "playbooks"], require_secure=False
    )
    execs = SensorRecord("exec_rate", 800, 800, 799, "bash", 1, 60, 1.0, 0.5, 0)
    executor, sink = storm(USER_BOMB, policies=policies, windows=10, before=(execs,))
    assert [step.action for _, step in executor.ran][:3] == ["renice", "quarantine", "kill"]
    assert not [d for d in sink.decisions if d.reason.startswith("another policy")]
