"""The compiler: policies become tiers, window classes and stable rule ids."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from remedy.actions.params import PARAMS
from remedy.compiler import compile_plan, plan_problems
from remedy.policy.model import NOTHING, Playbook, Policy, PolicySet, RateLimit, Selector, Step


def policy(name: str, threshold: int, window_s: float = 1.0, **kw: object) -> Policy:
    base = Policy(
        name=name,
        file=Path("p.yaml"),
        signal="fork_rate",
        threshold=threshold,
        window_s=window_s,
        playbook="notify",
        dry_run=False,
        cooldown_s=5.0,
        release_after_s=60.0,
        rate_limit=RateLimit(5, 60.0),
        match=NOTHING,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def policy_set(*policies: Policy) -> PolicySet:
    step = Step("notify", PARAMS["notify"]())
    book = Playbook("notify", Path("b.yaml"), (step,))
    return PolicySet(policies=policies, playbooks=MappingProxyType({"notify": book}))


def test_tiers_of_one_window_share_a_class_in_threshold_order() -> None:
    plan = compile_plan(
        policy_set(
            policy("kill", 1000),
            policy("notify", 100),
            policy("slow", 900, window_s=5.0),
            policy("ci", 300, match=Selector(cgroups=("/ci/*",))),
        )
    )
    fork = plan.signals["fork_rate"]
    assert [(c.window_s, [t.policy for t in c.tiers]) for c in fork.classes] == [
        (1.0, ["notify", "ci", "kill"]),
        (5.0, ["slow"]),
    ]
    ci = next(t for _, t in fork.tiers() if t.policy == "ci")
    assert ci.cgroups == ("/ci/*",) and not ci.everywhere
    assert len({t.rule for t in fork.slots}) == 4
    assert all(plan.policy_of(t.rule) == t.policy for t in fork.slots)
    assert plan.policy_of(0) is None


def test_rule_ids_survive_a_recompile_and_the_generation_goes_up() -> None:
    first = compile_plan(policy_set(policy("a", 100), policy("b", 500)))
    second = compile_plan(policy_set(policy("b", 700), policy("c", 50)), previous=first)
    assert second.generation == first.generation + 1
    rule_of = {t.policy: t.rule for _, t in second.signals["fork_rate"].tiers()}
    assert rule_of["b"] == next(t.rule for t in first.signals["fork_rate"].slots if t.policy == "b")
    # a new policy never takes the id of one that went away (a record in flight names "a")
    assert rule_of["c"] not in {t.rule for t in first.signals["fork_rate"].slots}


def test_in_kernel_enforcement_follows_the_policy_and_its_dry_run() -> None:
    scoped = Selector(cgroups=("/ci/*",))
    plan = compile_plan(policy_set(policy("k", 500, kernel="kill", dry_run=True, match=scoped)))
    tier = plan.signals["fork_rate"].slots[0]
    assert tier.fastpath is not None
    assert (tier.fastpath.signal, tier.fastpath.dry_run) == (9, True)


def test_limits_are_refused_by_name() -> None:
    many = [policy(f"p{i}", 100 + i) for i in range(9)]
    assert [p.key for p in plan_problems(many)] == ["signal"]
    windows = [policy(f"w{i}", 100, window_s=float(i + 1)) for i in range(5)]
    assert [(p.key, p.policy.name) for p in plan_problems(windows)] == [("window", "w4")]
    with pytest.raises(ValueError, match="at most 8 tiers"):
        compile_plan(policy_set(*many))


def test_in_kernel_enforcement_must_stay_inside_named_cgroups() -> None:
    # The kernel tests the cgroup alone: a `kernel: kill` selecting by uid (or nothing, or with
    # an exclude) would kill what user space would have spared.
    scoped = Selector(cgroups=("/ci/*",))
    assert plan_problems([policy("ok", 500, kernel="kill", match=scoped)]) == []
    for bad in (
        policy("all", 500, kernel="kill"),
        policy("uid", 500, kernel="kill", match=Selector(cgroups=("/ci/*",), uids=(1000,))),
        policy("ex", 500, kernel="kill", match=scoped, exclude=Selector(comms=("sshd",))),
    ):
        assert [p.key for p in plan_problems([bad])] == ["kernel"], bad.name


def test_the_agents_dry_run_makes_every_kernel_enforcement_count_only() -> None:
    enforcing = policy("k", 500, kernel="kill", match=Selector(cgroups=("/ci/*",)))
    plan = compile_plan(policy_set(enforcing), dry_run=True)
    tier = plan.signals["fork_rate"].slots[0]
    assert tier.fastpath is not None and tier.fastpath.dry_run


def test_a_sustain_the_kernel_cannot_count_is_refused() -> None:
    assert [p.key for p in plan_problems([policy("long", 100, sustain=256)])] == ["for"]
    assert plan_problems([policy("ok", 100, sustain=255)]) == []
