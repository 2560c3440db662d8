"""PolicySet → SensorPlan: the one place policies become sensor rules (oomd's compiler stage).

Each policy is one tier of its signal. Tiers with the same window length share a window class.
Rule ids are stable across recompiles for a policy that keeps its name (an operator reading two
audit lines, or a record in flight across a reload, sees the same id for the same policy); the
generation goes up by one with every recompile.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from remedy.compiler.plan import (
    MAX_CLASSES,
    MAX_TIERS,
    FastPathRule,
    SensorPlan,
    SignalPlan,
    Tier,
    WindowClass,
)

if TYPE_CHECKING:  # the loader imports this module to check limits: no import cycle at run time
    from remedy.policy.model import Policy, PolicySet

__all__ = ["PlanProblem", "compile_plan", "plan_problems"]

#: What ``kernel:`` on a policy asks the kernel to send at the threshold.
FASTPATH_SIGNALS = {"kill": 9, "stop": 19}
#: Signals the kernel can enforce on by itself: the forker is the current task at the event.
FASTPATH_CAPABLE = frozenset({"fork_rate"})


#: The kernel's per-tier streak is a byte that stops at 255 (bpf/remedy.bpf.c).
MAX_SUSTAIN = 255


def _kernel_selectable(policy: Policy) -> bool:
    m = policy.match
    others = (m.comms, m.exes, m.cmdlines, m.uids, m.containers, m.pods)
    return bool(m.cgroups) and not any(others) and policy.exclude.empty


@dataclass(frozen=True)
class PlanProblem:
    """A policy set the kernel cannot hold: which policy, which key, and why."""

    policy: Policy
    key: str
    message: str


def plan_problems(policies: Iterable[Policy]) -> list[PlanProblem]:
    """Everything that keeps ``policies`` from compiling, each naming a policy (the loader adds
    the file and line)."""
    problems: list[PlanProblem] = []
    by_signal: dict[str, list[Policy]] = {}
    for p in policies:
        by_signal.setdefault(p.signal, []).append(p)
        if p.sustain > MAX_SUSTAIN:
            problems.append(
                PlanProblem(p, "for", f"the kernel counts at most {MAX_SUSTAIN} windows in a row")
            )
        if p.kernel and not _kernel_selectable(p):
            # The kernel can test only the cgroup: every other selector, `exclude:` and the
            # protected set are user space's. An in-kernel kill must stay inside cgroups the
            # operator named, so that nothing the policy did not mean is ever in reach.
            problems.append(
                PlanProblem(
                    p,
                    "kernel",
                    "in-kernel enforcement needs `match:` to name cgroups and nothing else "
                    "(no comms, exes, cmdlines, uids, containers, pods, no `exclude:`): the "
                    "kernel tests the cgroup alone, before any user-space check",
                )
            )
        if p.kernel and p.signal not in FASTPATH_CAPABLE:
            problems.append(
                PlanProblem(
                    p,
                    "kernel",
                    f"in-kernel enforcement works on {', '.join(sorted(FASTPATH_CAPABLE))} "
                    f"only (the kernel signals the forker at its fork), not {p.signal}",
                )
            )
    for signal, group in by_signal.items():
        if len(group) > MAX_TIERS:
            problems.append(
                PlanProblem(
                    group[MAX_TIERS],
                    "signal",
                    f"{len(group)} policies watch {signal}; the kernel holds at most "
                    f"{MAX_TIERS} tiers per signal",
                )
            )
        windows: list[float] = []
        for p in group:
            if p.window_s not in windows:
                windows.append(p.window_s)
                if len(windows) == MAX_CLASSES + 1:
                    problems.append(
                        PlanProblem(
                            p,
                            "window",
                            f"{signal} would need {len(windows)} window lengths "
                            f"({', '.join(f'{w:g} s' for w in windows)}); the kernel holds at "
                            f"most {MAX_CLASSES} per signal: give some policies the same window",
                        )
                    )
        lifetimes = {p.lifetime_s for p in group}
        if len(lifetimes) > 1:
            problems.append(
                PlanProblem(
                    group[-1],
                    "lifetime",
                    f"policies on {signal} disagree on lifetime "
                    f"({', '.join(f'{x:g} s' for x in sorted(lifetimes))}); the kernel decides "
                    "short-lived once per signal",
                )
            )
    return problems


def _tier(policy: Policy, rule: int, dry_run: bool) -> Tier:
    fastpath = (
        FastPathRule(FASTPATH_SIGNALS[policy.kernel], policy.dry_run or dry_run)
        if policy.kernel
        else None
    )
    return Tier(
        rule=rule,
        policy=policy.name,
        threshold=policy.threshold,
        sustain=max(1, policy.sustain),
        cgroups=policy.match.cgroups,
        fastpath=fastpath,
    )


def _rule_ids(policies: Iterable[Policy], previous: SensorPlan | None) -> dict[str, int]:
    known: dict[str, int] = {}
    if previous is not None:
        for _, sp in previous.signals.items():
            for _, tier in sp.tiers():
                known[tier.policy] = tier.rule
    ids: dict[str, int] = {}
    next_id = max(known.values(), default=0) + 1
    for p in policies:
        if p.name in known:
            ids[p.name] = known[p.name]
        else:
            ids[p.name] = next_id
            next_id += 1
    return ids


def compile_plan(
    policies: PolicySet, previous: SensorPlan | None = None, *, dry_run: bool = False
) -> SensorPlan:
    """The plan for ``policies``; ``previous`` (the running plan) keeps rule ids stable and
    gives the generation; ``dry_run`` (the agent's --dry-run) makes every in-kernel enforcement
    count only, whatever the policies say. ValueError for a set ``plan_problems`` refuses (the
    loader never hands one over)."""
    problems = plan_problems(policies.policies)
    if problems:
        raise ValueError("; ".join(f"{p.policy.name}: {p.message}" for p in problems))
    ids = _rule_ids(policies.policies, previous)
    signals: dict[str, SignalPlan] = {}
    for signal in dict.fromkeys(p.signal for p in policies.policies):
        group = policies.for_signal(signal)
        classes: list[WindowClass] = []
        for index, window in enumerate(dict.fromkeys(p.window_s for p in group)):
            tiers = sorted(
                (_tier(p, ids[p.name], dry_run) for p in group if p.window_s == window),
                key=lambda t: (t.threshold, t.rule),
            )
            classes.append(WindowClass(index, window, tuple(tiers)))
        signals[signal] = SignalPlan(signal, tuple(classes), lifetime_s=group[0].lifetime_s)
    generation = previous.generation + 1 if previous is not None else 1
    return SensorPlan(signals, generation)
