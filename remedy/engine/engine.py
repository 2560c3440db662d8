"""The engine: records in, decisions out.

It owns everything every action gets for free: policy matching, protection, per-offender state
and cooldowns, per-policy rate limits, dry-run and escalation along the playbook's steps. Actions
only ever see a decision to act. Dry-run walks the same control flow and skips only the side
effect, so an audit run shows exactly what enforcement would do, including cooldowns and
escalation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from remedy.clock import Clock
from remedy.engine.decisions import ACTED, SKIPPED, WOULD_ACT, Decision, DecisionSink
from remedy.engine.guards import Protector, RateLimiter
from remedy.engine.offender import Offender, Subject, attach, detach, fire, new_machine
from remedy.errors import ActionError
from remedy.policy import Policy, PolicySet, Step
from remedy.sensors.catalog import SIGNALS
from remedy.sensors.context import Context
from remedy.sensors.records import SensorRecord

log = logging.getLogger(__name__)


class Identifier(Protocol):
    """Turns a kernel record into a pinned Subject; raises ProcessGone when it already exited."""

    def identify(self, record: SensorRecord) -> Subject: ...


class Executor(Protocol):
    """Runs (or describes) one playbook step against a subject."""

    def describe(self, step: Step, subject: Subject) -> str: ...

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str: ...

    def release(self, subject: Subject) -> None: ...


def _context_json(context: Context | None) -> dict[str, Any] | None:
    if context is None:
        return None
    data = dataclasses.asdict(context)
    data["summary"] = context.summary()
    return data


@dataclass(frozen=True)
class _Case:
    """One policy evaluated on one record: what a decision is about."""

    policy: Policy
    record: SensorRecord
    offender: Offender
    step: Step
    step_index: int
    dry_run: bool


class Engine:
    """Evaluates policies against records. Single-threaded: call from the worker thread only."""

    def __init__(
        self,
        policies: PolicySet,
        *,
        identifier: Identifier,
        executor: Executor,
        sink: DecisionSink,
        clock: Clock,
        protector: Protector,
        dry_run: bool = False,
    ) -> None:
        self.policies = policies
        self._identifier = identifier
        self._executor = executor
        self._sink = sink
        self._clock = clock
        self._protector = protector
        self.dry_run = dry_run
        self._machine = new_machine()
        self._offenders: dict[tuple[int, int, str], Offender] = {}
        self._limiters = {
            p.name: RateLimiter(p.rate_limit.max_actions, p.rate_limit.per_s)
            for p in policies.policies
        }
        self._by_name = {p.name: p for p in policies.policies}
        self.stats: Counter[str] = Counter()

    def offenders(self) -> Iterator[Offender]:
        return iter(self._offenders.values())

    def on_record(self, record: SensorRecord) -> None:
        """Evaluate every policy on this record's signal."""
        self.stats["records"] += 1
        policies = self.policies.for_signal(record.signal)
        if not policies:
            self.stats["unmatched"] += 1
            return
        try:
            subject = self._identifier.identify(record)
        except ActionError as err:
            # Exited (or its pid was reused) between the crossing and now: nothing to act on.
            self.stats[f"identify-{err.outcome}"] += 1
            log.info("record for pid %d (%s) dropped: %s", record.tgid, record.comm, err)
            return
        for policy in policies:
            self._evaluate(policy, record, subject)

    def _offender(self, policy: Policy, subject: Subject, now: float) -> Offender:
        key = (subject.pid, subject.start_ticks, policy.name)
        offender = self._offenders.get(key)
        if offender is None:
            offender = attach(self._machine, Offender(subject, policy.name, now, now))
            self._offenders[key] = offender
        elif subject.handle is not None and subject.handle is not offender.subject.handle:
            subject.handle.close()  # the offender already holds a pidfd for this process
        offender.last_seen = now
        offender.records += 1
        return offender

    def _evaluate(self, policy: Policy, record: SensorRecord, subject: Subject) -> None:
        if not policy.match.matches(subject.cgroup, subject.comm):
            self.stats["unmatched"] += 1
            if subject.handle is not None:
                subject.handle.close()
            return
        now = self._clock.monotonic()
        offender = self._offender(policy, subject, now)
        subject = offender.subject
        playbook = self.policies.playbook_for(policy)
        step_index = min(offender.step, len(playbook.steps) - 1)
        step = playbook.steps[step_index]
        dry_run = self.dry_run or policy.dry_run

        case = _Case(policy, record, offender, step, step_index, dry_run)

        def decide(outcome: str, reason: str, detail: str = "") -> None:
            self._emit(case, outcome, reason, detail)

        if offender.state == "cooldown":
            left = offender.cooldown_until - now
            decide(SKIPPED, f"cooldown, {left:.1f} s left")
            return
        fire(offender, "offend")
        protected = self._protector.why_protected(subject)
        if protected is not None:
            fire(offender, "hold")
            decide(SKIPPED, f"protected: {protected}")
            return
        if record.degraded and step.action == "kill":
            # Records were lost around this window: the count may be right, but a kill is not
            # something to do on partial data. Earlier, reversible steps still run.
            fire(offender, "hold")
            decide(SKIPPED, "degraded window: records were lost; never kill on partial data")
            return
        limiter = self._limiters[policy.name]
        if not limiter.allow(now):
            fire(offender, "hold")
            retry = limiter.retry_in(now)
            limit = policy.rate_limit
            decide(
                SKIPPED,
                f"rate limit {limit.max_actions} per {limit.per_s:g} s, next in {retry:.1f} s",
            )
            return
        fire(offender, "act")
        plan = self._executor.describe(step, subject)
        if dry_run:
            self._after_action(offender, policy, now)
            decide(WOULD_ACT, "dry-run", plan)
            return
        try:
            detail = self._executor.execute(step, subject, policy)
        except ActionError as err:
            fire(offender, "hold")
            decide(err.outcome, str(err), plan)
            return
        self._after_action(offender, policy, now)
        decide(ACTED, "threshold crossed", f"{plan}; {detail}" if detail else plan)

    def _after_action(self, offender: Offender, policy: Policy, now: float) -> None:
        offender.step += 1
        offender.cooldown_until = now + policy.cooldown_s
        fire(offender, "acted")

    def _emit(self, case: _Case, outcome: str, reason: str, detail: str) -> None:
        policy, record, offender = case.policy, case.record, case.offender
        subject = offender.subject
        what = record.describe(policy.threshold, SIGNALS[record.signal].noun)
        about = f" [{subject.context.summary()}]" if subject.context else ""
        target = (
            f"{case.step.action} pid {subject.pid} ({subject.comm}) "
            f"in {subject.cgroup_display}{about}: {what}"
        )
        if outcome == WOULD_ACT:
            text = f"would {target}; {detail}"
        elif outcome == ACTED:
            text = f"{target}; {detail}"
        else:
            text = f"{outcome} ({reason}): {target}"
        decision = Decision(
            time=self._clock.wall(),
            policy=policy.name,
            signal=record.signal,
            pid=subject.pid,
            start_ticks=subject.start_ticks,
            comm=subject.comm,
            ppid=subject.ppid,
            exe=subject.exe,
            cgroup=subject.cgroup_display,
            count=record.count,
            window_s=record.window_s,
            action=case.step.action,
            step=case.step_index,
            dry_run=case.dry_run,
            outcome=outcome,
            reason=reason,
            message=text,
            state=offender.state,
            degraded=record.degraded,
            context=_context_json(subject.context),
            stack=subject.stack,
        )
        self.stats[f"decision-{outcome}"] += 1
        self._sink.record(decision)

    def tick(self) -> None:
        """Advance time: end cooldowns, release offenders that exited or went quiet."""
        now = self._clock.monotonic()
        for key, offender in list(self._offenders.items()):
            policy = self._by_name[offender.policy]
            handle = offender.subject.handle
            exited = handle is not None and handle.has_exited()
            if offender.state == "cooldown" and (now >= offender.cooldown_until or exited):
                fire(offender, "cooled")
            quiet = now - offender.last_seen >= policy.release_after_s
            if offender.state == "observed" and (quiet or exited):
                self._release(key, offender)

    def _release(self, key: tuple[int, int, str], offender: Offender) -> None:
        fire(offender, "release")
        self.stats["released"] += 1
        try:
            self._executor.release(offender.subject)
        except ActionError as err:
            log.warning("release of pid %d: %s", offender.subject.pid, err)
        if offender.subject.handle is not None:
            offender.subject.handle.close()
        detach(self._machine, offender)
        del self._offenders[key]

    def close(self) -> None:
        """Release every offender (closes pidfds)."""
        for key, offender in list(self._offenders.items()):
            if offender.state in ("acting", "offending"):
                fire(offender, "hold")
            if offender.state == "cooldown":
                fire(offender, "cooled")
            self._release(key, offender)
