"""The agent compiles once per load and hands the same plan to the sensor and the engine; a
reload compiles against the running plan (stable rule ids, generation + 1)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remedy.compiler import SensorPlan, compile_plan
from remedy.policy import PolicySet, load_policy_set
from remedy.sensors.startup import LossWatch
from remedy.service.agent import Agent, AgentOptions

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: tell
steps:
  - action: notify
"""


def policy(name: str, threshold: int) -> str:
    return f"""\
apiVersion: remedy/v1
kind: Policy
name: {name}
signal: fork_rate
threshold: {threshold}
window: 1s
playbook: tell
"""


@dataclass
class FakeSensor:
    kind: str = "sampler"
    configured: list[SensorPlan] = field(default_factory=list)

    def configure(self, plan: SensorPlan) -> None:
        self.configured.append(plan)

    def hold(self, record: Any) -> None:  # speaks the plan protocol (no legacy shim)
        pass


@dataclass
class FakeEngine:
    plan: SensorPlan
    reloaded: list[tuple[PolicySet, SensorPlan]] = field(default_factory=list)

    def reload(self, policies: PolicySet, plan: SensorPlan) -> None:
        self.reloaded.append((policies, plan))
        self.plan = plan


def test_a_reload_compiles_against_the_running_plan_and_hands_it_to_sensor_and_engine(
    tmp_path: Path,
) -> None:
    pol, play = tmp_path / "policies", tmp_path / "playbooks"
    pol.mkdir()
    play.mkdir()
    (play / "tell.yaml").write_text(PLAYBOOK)
    (pol / "b-contain.yaml").write_text(policy("contain", 500))
    (pol / "c-warn.yaml").write_text(policy("warn", 100))
    running = compile_plan(load_policy_set((pol,), (play,)))
    # The reload reorders the files (a fresh compile would number "warn" first) and changes
    # a threshold.
    (pol / "b-contain.yaml").rename(pol / "d-contain.yaml")
    (pol / "c-warn.yaml").write_text(policy("warn", 150))
    engine, sensor = FakeEngine(running), FakeSensor()
    agent = Agent(AgentOptions((pol,), (play,)), out=io.StringIO())
    agent._do_reload(engine, sensor, LossWatch(running))  # type: ignore[arg-type]
    [(_, plan)] = engine.reloaded
    assert sensor.configured == [plan]  # one compile: the sensor and the engine agree
    assert plan.generation == running.generation + 1
    for name in ("warn", "contain"):
        assert [t.rule for _, _, t in plan.tiers_of(name)] == [
            t.rule for _, _, t in running.tiers_of(name)
        ]
    assert [t.threshold for _, _, t in plan.tiers_of("warn")] == [150]
