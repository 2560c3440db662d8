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
import math
import resource
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from remedy.clock import Clock
from remedy.compiler import SensorPlan, Tier, WindowClass, compile_plan
from remedy.engine.decisions import (
    ACTED,
    BREAKER_TRIPPED,
    INTENT,
    RECOVERED,
    SKIPPED,
    WOULD_ACT,
    Decision,
    DecisionSink,
    writes_ahead,
)
from remedy.engine.guards import (
    Breakers,
    Protector,
    RateLimiter,
    changes_process,
    ends_process,
)
from remedy.engine.offender import Handle, Offender, Subject, attach, detach, fire, new_machine
from remedy.errors import ActionError, IdentityUnverified, SensorError
from remedy.policy import SEVERITIES, Facts, Policy, PolicySet, Silence, Step
from remedy.proc import ProcessInfo
from remedy.sensors.catalog import SIGNALS
from remedy.sensors.context import Context
from remedy.sensors.records import SensorRecord

log = logging.getLogger(__name__)

# Offenders tracked at once (one per process or cgroup and policy). Beyond it the least recently
# seen idle one is forgotten; when none may be, a new one is refused (see Engine).
DEFAULT_MAX_OFFENDERS = 10_000
# Open pidfds are kept to this share of the soft RLIMIT_NOFILE: the rest is the audit, journal,
# BPF maps, sockets and bcc's own descriptors (issue 11: EMFILE from about 1,000 offenders).
HANDLE_SHARE_OF_NOFILE = 0.5

# The agent ticks after every record: a tick looks at this many offenders at least, and at as
# many more as keep a full pass within SWEEP_PERIOD_S, so its cost is bounded per tick and per
# second, not O(offenders) per record. Up to SWEEP_MIN offenders, every tick is a full pass.
SWEEP_MIN = 16
SWEEP_PERIOD_S = 1.0

SubjectKey = tuple[int, int]  # (pid, start ticks); (0, inode) for a cgroup
OffenderKey = tuple[int, int, str]  # with the policy's name


def handle_budget(max_offenders: int, soft_nofile: int | None = None) -> int:
    """How many pidfds the engine may hold: never more than one per offender, and well under
    the soft fd limit (``soft_nofile``; default: this process's as it stands now)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if soft_nofile is None else soft_nofile
    if soft == resource.RLIM_INFINITY:
        return max_offenders
    return max(1, min(max_offenders, int(soft * HANDLE_SHARE_OF_NOFILE)))


class Identifier(Protocol):
    """Turns a kernel record into a pinned Subject; raises ProcessGone when it already exited."""

    def identify(self, record: SensorRecord) -> Subject: ...


class Executor(Protocol):
    """Runs (or describes) one playbook step against a subject."""

    def describe(self, step: Step, subject: Subject) -> str: ...

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str: ...

    def release(self, subject: Subject) -> None: ...


@runtime_checkable
class Timed(Protocol):
    """An executor with timers of its own (a terminate's grace period): advanced on every
    tick, settled on close; each returns the audit lines of what it did."""

    def tick(self, announce: Callable[[Decision], None] | None = None) -> list[Decision]: ...

    def close(self, announce: Callable[[Decision], None] | None = None) -> list[Decision]: ...


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
    facts: Facts


def facts_of(subject: Subject) -> Facts:
    """What selectors and silences test, from what identification read."""
    context = subject.context
    container = context.container if context else None
    return Facts(
        cgroup=subject.cgroup,
        comm=subject.comm,
        exe=subject.exe,
        cmdline=context.cmdline if context else "",
        uid=subject.uid,
        container_id=container.container_id if container else None,
        pod_uid=container.pod_uid if container else None,
    )


class Undo(Protocol):
    """Takes back what reversible steps changed (the undo journal, issue 5)."""

    def revert_offender(self, subject: Subject, reason: str) -> list[str]: ...

    def revert_policy(self, policy: str, reason: str) -> list[str]: ...

    def expire(self) -> list[str]: ...

    def revert_all(self, reason: str) -> list[str]: ...


# Plans kept for routing: a record names the generation its tier was written with, and may
# still be in flight (queued, or in the ring buffer) a few reloads later.
KEEP_PLANS = 4
# A held incident is re-measured this often per window (the sensor no longer re-emits it): a
# storm that goes on is seen before its window ends, whatever the phase of the ticks.
MEASURES_PER_WINDOW = 4


class Incidents(Protocol):
    """What the engine asks of the sensor about an open incident (catalog.Sensor has it)."""

    def measure(self, record: SensorRecord) -> int | None:
        """The current value of the record's window, in the signal's unit; None: unknown."""
        ...

    def hold(self, record: SensorRecord) -> None:
        """An incident is open for the record's key: do not re-emit tiers already emitted."""
        ...

    def unhold(self, record: SensorRecord) -> None:
        """The incident ended: the next crossing emits again."""
        ...


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
        sensor: Incidents | None = None,
        plan: SensorPlan | None = None,
        undo: Undo | None = None,
        keep_on_close: bool = False,
        max_offenders: int = DEFAULT_MAX_OFFENDERS,
        max_handles: int | None = None,
    ) -> None:
        """``max_offenders`` caps tracked offenders and ``max_handles`` the pidfds they hold
        (default: :func:`handle_budget`). When a new offender does not fit, the least recently
        seen idle one (observed, nothing applied) is evicted, its pidfd closed; one that is
        remediating, cooling down or has applied a change is never evicted. When none can be,
        the new offender is refused and its record audited as skipped.

        ``plan`` is the sensor plan compiled from ``policies`` (default: compiled here); records
        route to a policy by their rule id through the plan of their generation. ``sensor`` is
        asked to hold an incident while its offender is tracked, and re-measures it."""
        if max_offenders < 1 or (max_handles is not None and max_handles < 1):
            raise ValueError("max_offenders and max_handles must be at least 1")
        self.policies = policies
        self._identifier = identifier
        self._executor = executor
        # Checked once: a runtime Protocol check walks the protocol's attributes (per tick).
        self._timed = executor if isinstance(executor, Timed) else None
        self._sink = sink
        self._clock = clock
        self._base_protector = protector
        self._protector = protector.extended(policies)
        self.dry_run = dry_run
        self._runtime_silences: list[Silence] = []  # added over the control socket
        self._sensor = sensor
        self.plan = plan if plan is not None else compile_plan(policies)
        self._plans: OrderedDict[int, SensorPlan] = OrderedDict({self.plan.generation: self.plan})
        # Incidents held in the sensor, by (signal, window class, key, key birth): several
        # policies tracking one process share the sensor's hold, released with the last.
        self._incidents: Counter[tuple[str, int, int, int, int]] = Counter()
        self._undo = undo
        self._keep_on_close = keep_on_close
        self._breakers = Breakers()
        self._guards = (
            self._protected,
            self._silenced,
            self._degraded,
            self._precedence,
            self._rate_limited,
        )
        self._machine = new_machine()
        # In sweep order: tick() takes them from the front and moves each to the back.
        self._offenders: OrderedDict[OffenderKey, Offender] = OrderedDict()
        self._swept_at: float | None = None
        # The same offenders by process: lookups by (pid, start) cost O(policies), not O(n).
        self._by_subject: dict[SubjectKey, dict[str, Offender]] = {}
        # Processes whose every offender may be evicted, least recently seen first.
        self._idle: OrderedDict[SubjectKey, None] = OrderedDict()
        self.max_offenders = max_offenders
        self.max_handles = handle_budget(max_offenders) if max_handles is None else max_handles
        self._handles = 0  # processes tracked with a pidfd (all their offenders share it)
        # Offenders whose current step changes their process (not a notify): only these can
        # hold precedence over other policies (see _holds).
        self._holders: set[tuple[int, int, str]] = set()
        # When each signal last brought a degraded record: the agent taints every record of a
        # signal after a loss, so a judged escalation between records can see the taint too.
        self._degraded_at: dict[str, float] = {}
        self._limiters = {
            p.name: RateLimiter(p.rate_limit.max_actions, p.rate_limit.per_s)
            for p in policies.policies
        }
        self._by_name = {p.name: p for p in policies.policies}
        self.stats: Counter[str] = Counter()

    def silences(self) -> tuple[Silence, ...]:
        """Silences from the policy files and those added at run time (which survive reloads)."""
        return (*self.policies.silences, *self._runtime_silences)

    def add_silence(self, silence: Silence) -> None:
        if any(s.name == silence.name for s in self.silences()):
            raise ValueError(f"a silence named {silence.name!r} exists already")
        self._runtime_silences.append(silence)

    def expire_silence(self, name: str) -> bool:
        """End a run-time silence now; file silences end by editing the file and reloading."""
        before = len(self._runtime_silences)
        self._runtime_silences = [s for s in self._runtime_silences if s.name != name]
        return len(self._runtime_silences) < before

    def release_offender(self, pid: int, policy: str | None = None) -> list[str]:
        """Manual undo: revert what was done to ``pid`` and forget it (``remedy release``)."""
        reverted: list[str] = []
        for key, offender in list(self._offenders.items()):
            if offender.subject.pid != pid or (policy and offender.policy != policy):
                continue
            if self._undo is not None and not reverted:
                reverted = self._undo.revert_offender(offender.subject, "released by operator")
            if offender.state == "cooldown":
                fire(offender, "cooled")
            self._release(key, offender, revert=False)
            self.stats["released-by-operator"] += 1
        return reverted

    def spare(self, info: ProcessInfo) -> str | None:
        """Why an action reaching beyond the offender must leave this process alone."""
        return self._protector.why(info)

    def offenders(self) -> Iterator[Offender]:
        return iter(self._offenders.values())

    def on_record(self, record: SensorRecord) -> None:
        """Evaluate every policy on this record's signal."""
        self.stats["records"] += 1
        if record.degraded:
            self._degraded_at[record.signal] = self._clock.monotonic()
        policies = self._route(record)
        if not policies:
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
        # Only once every policy of the signal has seen it: one that does not apply must not
        # close the pidfd a later one acts through.
        if subject.handle is not None and not self._tracked(subject):
            subject.handle.close()
        self._refile(subject.key, seen=True)

    def _route(self, record: SensorRecord) -> tuple[Policy, ...]:
        """The policy a record is for: its rule through the plan of its generation (a record in
        flight across a reload reaches the policy that produced it). Rule 0 (an old trace, a
        sensor without tiers) falls back to every policy of the signal. A rule no kept plan
        knows, or whose policy is gone, is counted and audited, never given to another policy."""
        if record.rule == 0:
            # Without a rule the record says only that the signal's lowest filter crossed: it
            # reaches no policy whose threshold its count does not (warn at 100 / contain at
            # 500 on a sensor without tiers must not contain at 150).
            policies = tuple(
                p for p in self.policies.for_signal(record.signal) if record.count >= p.threshold
            )
            if not policies:
                self.stats["unmatched"] += 1
            return policies
        plan = self._plans.get(record.generation)
        found = plan.rule(record.rule) if plan is not None else None
        if plan is None:
            why = (
                f"plan generation {record.generation} is not kept (running {self.plan.generation})"
            )
        elif found is None or found[0] != record.signal:
            why = f"generation {record.generation} has no rule {record.rule} on {record.signal}"
        elif found[2].policy not in self._by_name:
            why = f"rule {record.rule} was policy {found[2].policy}, removed since"
        elif not self._same_tier(record, found):
            # A record from before a reload reaches its policy only if the policy's tier is
            # what produced it: a notify at 100 turned into a kill at 1,000 must not kill at 150.
            why = f"rule {record.rule} ({found[2].policy}) changed since its generation"
        else:
            return (self._by_name[found[2].policy],)
        self._unroutable(record, found[2].policy if found else "-", why)
        return ()

    def _same_tier(self, record: SensorRecord, found: tuple[str, WindowClass, Tier]) -> bool:
        if record.generation == self.plan.generation:
            return True
        now = self.plan.rule(record.rule)
        if now is None:
            return False
        (signal, cls, tier), (was_signal, was_cls, was) = now, found
        return (signal, cls.window_s, tier.threshold, tier.sustain, tier.cgroups) == (
            was_signal,
            was_cls.window_s,
            was.threshold,
            was.sustain,
            was.cgroups,
        )

    def _unroutable(self, record: SensorRecord, policy: str, why: str) -> None:
        self.stats["unroutable"] += 1
        log.warning("record for pid %d (%s) not routed: %s", record.tgid, record.comm, why)
        self._sink.record(
            Decision(
                time=self._clock.wall(),
                policy=policy,
                signal=record.signal,
                pid=record.tgid,
                start_ticks=0,
                comm=record.comm,
                ppid=record.ppid,
                exe=None,
                cgroup="",
                count=record.count,
                window_s=record.window_s,
                action=None,
                step=0,
                dry_run=self.dry_run,
                outcome=SKIPPED,
                reason=f"unroutable: {why}",
                message=f"skipped (unroutable: {why}): pid {record.tgid} ({record.comm})",
                state="observed",
                degraded=record.degraded,
            )
        )
        self.stats[f"decision-{SKIPPED}"] += 1

    def _offender(self, policy: Policy, subject: Subject, now: float) -> Offender | None:
        """The offender this record is about, made when new; None when the table is full of
        offenders that may not be evicted."""
        key = (subject.pid, subject.start_ticks, policy.name)
        offender = self._offenders.get(key)
        known = self._offenders_of(subject)
        # In use now: never evicted to make room for its own offender under another policy
        # (on_record files it again, as the most recently seen).
        self._idle.pop(subject.key, None)
        if subject.is_cgroup:
            # The same cgroup (same inode) window after window, under every policy that tracks
            # it; what it holds now (members, the crossing process in its context) is this
            # record's. Its pin holds no descriptor, so nothing is shared or closed.
            for other in known:
                other.subject = subject
            if offender is None:
                offender = self._admit(key, Offender(subject, policy.name, now, now))
        elif offender is None:
            # Another policy may already track this process: share its subject and pidfd.
            if known:
                if subject.handle is not None and subject.handle is not known[0].subject.handle:
                    subject.handle.close()
                subject = known[0].subject
            offender = self._admit(key, Offender(subject, policy.name, now, now))
        elif subject.handle is not None and subject.handle is not offender.subject.handle:
            subject.handle.close()  # the offender already holds a pidfd for this process
        if offender is None:
            return None
        offender.last_seen = now
        offender.records += 1
        return offender

    # -- the offender table: bounded in offenders and pidfds, indexed by process -------------

    def _admit(self, key: OffenderKey, offender: Offender) -> Offender | None:
        """Track a new offender, evicting idle ones to make room; None when none can be."""
        subject = offender.subject
        new_pin = subject.key not in self._by_subject and _holds_fd(subject)
        while len(self._offenders) >= self.max_offenders or (
            new_pin and self._handles >= self.max_handles
        ):
            if not self._evict_one():
                return None
        attach(self._machine, offender)
        self._offenders[key] = offender
        self._by_subject.setdefault(subject.key, {})[offender.policy] = offender
        if new_pin:
            self._handles += 1
        return offender

    def _evict_one(self) -> bool:
        """Forget the least recently seen idle process (all its offenders) and close its pidfd.
        Idle: observed, nothing applied, so there is nothing to revert or disarm; a later
        record of it starts over as a new offender."""
        if not self._idle:
            return False
        skey, _ = self._idle.popitem(last=False)
        group = self._by_subject.pop(skey)
        for offender in group.values():
            fire(offender, "release")
            self._end_incident(offender)
            detach(self._machine, offender)
            key = (skey[0], skey[1], offender.policy)
            del self._offenders[key]
            self._holders.discard(key)
        subject = next(iter(group.values())).subject
        self._unpin(subject)
        self.stats["offenders-evicted"] += len(group)
        log.debug("evicted idle offender pid %d (%d polic(ies))", subject.pid, len(group))
        return True

    def _unpin(self, subject: Subject) -> None:
        """The last offender of this process is gone: nobody else holds its pidfd."""
        if _holds_fd(subject):
            self._handles -= 1
        if subject.handle is not None:
            subject.handle.close()

    def _refile(self, skey: SubjectKey, *, seen: bool = False) -> None:
        """Keep ``_idle`` true for one process after its offenders changed: evictable when every
        one is observed with nothing applied; ``seen`` (a record) makes it the most recent."""
        group = self._by_subject.get(skey)
        if group is None or not all(_evictable(o) for o in group.values()):
            self._idle.pop(skey, None)
        elif seen or skey not in self._idle:
            self._idle[skey] = None
            self._idle.move_to_end(skey)

    def _refuse(self, policy: Policy, record: SensorRecord, subject: Subject, now: float) -> None:
        """No room for a new offender: audit the record as skipped, never crash."""
        self.stats["offenders-refused"] += 1
        case = self._case(policy, record, Offender(subject, policy.name, now, now))
        self._emit(
            case,
            SKIPPED,
            f"offender table full: {len(self._offenders)} offenders tracked "
            f"(max {self.max_offenders}), {self._handles} pidfds (max {self.max_handles}), "
            "none idle to evict",
        )

    def reload(self, policies: PolicySet, plan: SensorPlan | None = None) -> None:
        """Swap in a new, already validated policy set, keeping what was learned: offenders of
        policies that still exist keep their state, escalation step and cooldown; rate limits
        keep their history when unchanged; a policy demoted by its breaker starts over.
        Offenders of removed policies are released. ``plan`` (default: compiled here from the
        running one) routes new records; the last KEEP_PLANS plans still route records of
        their generation."""
        old_limits = {p.name: p.rate_limit for p in self.policies.policies}
        self.plan = plan if plan is not None else compile_plan(policies, previous=self.plan)
        self._plans[self.plan.generation] = self.plan
        self._plans.move_to_end(self.plan.generation)
        while len(self._plans) > KEEP_PLANS:
            self._plans.popitem(last=False)
        self.policies = policies
        self._by_name = {p.name: p for p in policies.policies}
        self._protector = self._base_protector.extended(policies)
        self._limiters = {
            p.name: (
                self._limiters[p.name]
                if old_limits.get(p.name) == p.rate_limit and p.name in self._limiters
                else RateLimiter(p.rate_limit.max_actions, p.rate_limit.per_s)
            )
            for p in policies.policies
        }
        for name in list(self._by_name):
            self._breakers.reset(name)
        # Offenders of removed policies go first: one left behind (a revert below that raises,
        # a full journal) would make every later tick raise KeyError on its policy name.
        for key, offender in list(self._offenders.items()):
            if offender.policy not in self._by_name:
                if offender.state == "cooldown":
                    fire(offender, "cooled")
                self._release(key, offender)
        if self._undo is not None:
            for name in old_limits.keys() - self._by_name.keys():
                for detail in self._undo.revert_policy(name, "policy removed"):
                    log.info("reverted (policy %s removed): %s", name, detail)
        self.stats["reloads"] += 1

    def _evaluate(self, policy: Policy, record: SensorRecord, subject: Subject) -> None:
        facts = facts_of(subject)
        why_not = policy.applies_to(facts)
        if why_not is not None:
            self.stats["unmatched"] += 1
            log.debug("policy %s does not apply to pid %d: %s", policy.name, subject.pid, why_not)
            return
        now = self._clock.monotonic()
        offender = self._offender(policy, subject, now)
        if offender is None:
            self._refuse(policy, record, subject, now)
            return
        case = self._case(policy, record, offender)
        step = case.step

        if offender.state == "cooldown":
            # Sensed, not a decision: the audit gets a line per step of the ladder, not one per
            # window (a sensor without holds still sends a record every window).
            self.stats["records-in-cooldown"] += 1
            return
        offender.last_record = record
        fire(offender, "suspect")
        for guard in self._guards:
            reason = guard(case, now)
            if reason is not None:
                fire(offender, "hold")
                self._emit(case, SKIPPED, reason)
                return
        if not case.dry_run:
            tripped = self._breakers.check(policy, offender.subject, now)
            if tripped is not None:
                self._alert(case, tripped)
                case = dataclasses.replace(case, dry_run=True)
        fire(offender, "confirm")
        fire(offender, "act")
        plan = self._executor.describe(step, offender.subject)
        if case.dry_run:
            self._after_action(offender, policy, step, now, case.record)
            demoted = self._breakers.demoted(policy.name)
            why = "monitor mode" if policy.dry_run and not self.dry_run else "dry-run"
            if demoted is not None:
                why = f"demoted to monitor by its breaker: {demoted}"
            self._emit(case, WOULD_ACT, why, plan)
            return
        self._act(case, plan, now)

    def _act(self, case: _Case, plan: str, now: float) -> None:
        """Run the step: every guard passed and it is not a dry run."""
        offender, policy, step = case.offender, case.policy, case.step
        # From here the step may change something (a failed apply too, half way): the journal
        # may hold it, so this offender is never evicted, only released (which reverts).
        offender.applied = True
        try:
            if ends_process(step) is not None and writes_ahead(self._sink):
                # Write-ahead: a kill must be in the audit before it happens. An audit that
                # cannot take the intent raises AuditUnavailable, and the step is refused.
                self._emit(case, INTENT, "about to end a process", plan)
            detail = self._executor.execute(step, offender.subject, policy)
        except ActionError as err:
            fire(offender, "hold")
            self._emit(case, err.outcome, str(err), plan)
            return
        except Exception as err:
            # Not an action's refusal (a full undo journal, an untranslated OSError, a bug):
            # the step may have run half way. Answer its intent, put the offender back to
            # observed (left in "remediating", every later record of it raises MachineError
            # and it is never released), and let the worker contain and count the fault.
            fire(offender, "hold")
            self._emit(case, "error", f"{type(err).__name__}: {err}", plan)
            raise
        self._breakers.record(policy, offender.subject, now)
        self._after_action(offender, policy, step, now, case.record)
        self._emit(case, ACTED, "threshold crossed", f"{plan}; {detail}" if detail else plan)

    # -- guards: each returns a reason to skip, or None. Order matters: the rate limiter
    # -- consumes a token, so it runs last.

    def _protected(self, case: _Case, now: float) -> str | None:
        subject = case.offender.subject
        if subject.is_cgroup:
            if subject.cgroup in ("", "/") and self._notify_only(case.policy):
                # The host (a host pressure policy: remedy/sensors/psi.py): notify-only, so
                # nothing is reached; any other step on the root stays refused, here and at
                # the reach gate.
                return None
            return self._protected_cgroup(subject)
        why = self._protector.why_protected(subject)
        return None if why is None else f"protected: {why}"

    def _notify_only(self, policy: Policy) -> bool:
        return all(s.action == "notify" for s in self.policies.playbook_for(policy).steps)

    def _protected_cgroup(self, subject: Subject) -> str | None:
        """A cgroup is protected when it is a hierarchy root, or when its subtree held a
        process the protector spares (pid 1, a kernel thread, the agent or one of its
        ancestors, a protected executable) when this window's record was identified: every
        action on it reaches the whole cgroup."""
        if subject.cgroup in ("", "/"):
            return "protected: the hierarchy root"
        for member in subject.members:
            why = self._protector.why_member(member)
            if why is not None:
                return f"protected: its cgroup holds pid {member.pid}, {why}"
        return None

    def _silenced(self, case: _Case, now: float) -> str | None:
        wall = self._clock.wall()
        for silence in self.silences():
            if silence.applies(case.policy.name, case.facts, wall):
                until = datetime.fromtimestamp(silence.expires, UTC).isoformat(timespec="seconds")
                return f"silenced by {silence.author} until {until}: {silence.reason}"
        return None

    def _degraded(self, case: _Case, now: float) -> str | None:
        # Records were lost around this window: the sensor flags it, and the agent's LossWatch
        # taints every record of a signal for two windows after any loss (ring buffer, window
        # map, queue) by setting the same flag before the record reaches the engine; a judged
        # escalation is flagged by _judge (its record's flag, or a taint seen since). The count
        # may be right, but ending a process (kill, terminate, a kernel arm, any scope) is not
        # something to do on partial data. Reversible steps still run.
        if not case.record.degraded:
            return None
        how = ends_process(case.step)
        if how is None:
            return None
        return f"degraded window: records were lost; never end a process on partial data ({how})"

    def _precedence(self, case: _Case, now: float) -> str | None:
        """One policy contains a process at a time; a higher severity may take over. Only an
        offender whose current step changed the process (enforced, not a notify) holds it: a
        notify-only step, a monitor-mode policy or one its breaker demoted never blocks
        another policy from containing the process."""
        mine = SEVERITIES.index(case.policy.severity)
        subject = case.offender.subject
        for other in self._offenders_of(subject):
            if other is case.offender or not self._holds(other):
                continue
            theirs = SEVERITIES.index(self._by_name[other.policy].severity)
            if theirs >= mine:
                return f"another policy is remediating: {other.policy}"
        return None

    def _holds(self, offender: Offender) -> bool:
        """Whether ``offender``'s policy holds its process now: its current step changes the
        process, and the policy enforces (monitor mode and a breaker's demotion never hold;
        under the global --dry-run an enforcing policy holds as it would when enforcing, so
        the audit shows what enforcement would do)."""
        key = (offender.subject.pid, offender.subject.start_ticks, offender.policy)
        policy = self._by_name[offender.policy]
        enforcing = not policy.dry_run and self._breakers.demoted(policy.name) is None
        return enforcing and offender.state in ("remediating", "cooldown") and key in self._holders

    def _rate_limited(self, case: _Case, now: float) -> str | None:
        limiter = self._limiters[case.policy.name]
        if limiter.allow(now):
            return None
        limit = case.policy.rate_limit
        return (
            f"rate limit {limit.max_actions} per {limit.per_s:g} s, "
            f"next in {limiter.retry_in(now):.1f} s"
        )

    def _alert(self, case: _Case, reason: str) -> None:
        """The breaker tripped: say so loudly, once, in the log and the audit."""
        log.warning("policy %s demoted to monitor: %s", case.policy.name, reason)
        self.stats["breaker-tripped"] += 1
        self._emit(case, BREAKER_TRIPPED, reason)

    def _offenders_of(self, subject: Subject) -> list[Offender]:
        group = self._by_subject.get(subject.key)
        return list(group.values()) if group else []

    def _tracked(self, subject: Subject) -> bool:
        return any(o.subject.handle is subject.handle for o in self._offenders_of(subject))

    def _after_action(
        self, offender: Offender, policy: Policy, step: Step, now: float, record: SensorRecord
    ) -> None:
        key = (offender.subject.pid, offender.subject.start_ticks, offender.policy)
        self._start_incident(offender, record, now)
        if changes_process(step):
            self._holders.add(key)
        else:
            self._holders.discard(key)
        offender.step += 1
        offender.cooldown_until = now + max(policy.cooldown_s, step.settle_s)
        offender.until_below = step.until_below
        judged = step.until_below is not None or step.settle_s > 0
        offender.judge_at = now + step.settle_s if judged else None
        fire(offender, "acted")

    # -- one record per incident: the sensor holds it while the offender is tracked ----------

    def _hold_key(self, record: SensorRecord) -> tuple[str, int, int, int, int] | None:
        plan = self._plans.get(record.generation)
        found = plan.rule(record.rule) if plan is not None and record.rule else None
        if found is None:
            return None  # no tier behind it (rule 0): nothing the sensor could hold
        # Per tier: each policy's incident holds its own tier of the key, never another's.
        return (record.signal, found[1].index, record.key, record.key_birth_ns, record.rule)

    def _start_incident(self, offender: Offender, record: SensorRecord, now: float) -> None:
        """The offender is tracked now (acted on, or followed in dry-run): ask the sensor to
        stop re-emitting its window; the engine re-measures it instead (see _remeasure)."""
        offender.measure_at = now + record.window_s / MEASURES_PER_WINDOW
        if offender.held is not None or self._sensor is None:
            return
        hold = self._hold_key(record)
        if hold is None:
            return
        offender.held = record
        self._incidents[hold] += 1
        if self._incidents[hold] == 1:
            try:
                self._sensor.hold(record)
            except SensorError as err:
                # The held map is full: the key keeps emitting every window (noisier, never
                # blind), and the step that was just taken is still audited and advanced.
                self.stats["hold-refused"] += 1
                log.warning("incident of pid %d not held: %s", record.tgid, err)

    def _end_incident(self, offender: Offender) -> None:
        """Released or recovered: the next crossing of its key emits again."""
        record, offender.held = offender.held, None
        if record is None or self._sensor is None:
            return
        hold = self._hold_key(record)
        if hold is None or self._incidents[hold] <= 0:
            return
        self._incidents[hold] -= 1
        if self._incidents[hold] == 0:
            del self._incidents[hold]
            self._sensor.unhold(record)

    def _remeasure(self, offender: Offender, policy: Policy, now: float) -> bool:
        """A held incident between steps: the sensor sends no more records for it, so read its
        window. Still over the policy's threshold → seen again (not quiet), and the next step
        is evaluated as for a fresh record. Whether it escalated."""
        record = offender.held
        if record is None or self._sensor is None or now < offender.measure_at:
            return False
        offender.measure_at = now + record.window_s / MEASURES_PER_WINDOW
        value = self._sensor.measure(record)
        if value is None or value < policy.threshold:
            return False
        self.stats["remeasured-over"] += 1
        measured = dataclasses.replace(record, count=value)
        if now - self._degraded_at.get(record.signal, -math.inf) < 2 * record.window_s:
            measured = dataclasses.replace(measured, degraded=True)
        self._evaluate(policy, measured, offender.subject)
        return True

    def _emit(self, case: _Case, outcome: str, reason: str, detail: str = "") -> None:
        policy, record, offender = case.policy, case.record, case.offender
        subject = offender.subject
        what = record.describe(policy.threshold, SIGNALS[record.signal].noun)
        about = f" [{subject.context.summary()}]" if subject.context else ""
        if subject.is_cgroup:
            target = (
                f"{case.step.action} cgroup {subject.cgroup_display} "
                f"(inode {subject.cgroup_inode}){about}: {what}"
            )
        else:
            target = (
                f"{case.step.action} pid {subject.pid} ({subject.comm}) "
                f"in {subject.cgroup_display}{about}: {what}"
            )
        if outcome == WOULD_ACT:
            text = f"would {target}; {detail}"
        elif outcome == ACTED:
            text = f"{target}; {detail}"
        else:
            text = f"{outcome} ({reason}): {target}" + (f"; {detail}" if detail else "")
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
        """Advance time: judge settled steps, end cooldowns, undo expired changes, release
        offenders that exited or went quiet."""
        now = self._clock.monotonic()
        # Each stage runs whatever the one before raised (a full undo journal must not keep
        # cooldowns from ending or offenders from being released); the first error is raised
        # at the end, for the worker to contain and count.
        failure: Exception | None = None
        try:
            if self._timed is not None:
                self._follow_up(self._timed.tick(self._announcer()))
        except Exception as err:
            failure = err
        try:
            self._expire()
        except Exception as err:
            failure = failure or err
        for _ in range(self._sweep_budget(now)):
            if not self._offenders:
                break
            key = next(iter(self._offenders))
            self._offenders.move_to_end(key)
            try:
                self._sweep(key, self._offenders[key], now)
            except Exception as err:  # its bookkeeping is done; the others go on
                failure = failure or err
        if failure is not None:
            raise failure

    def _expire(self) -> None:
        if self._undo is None:
            return
        for detail in self._undo.expire():
            # expire() also retries failed reverts; a retry that failed again is no revert.
            failed = "revert failed" in detail
            self.stats["revert-failed" if failed else "ttl-reverted"] += 1
            log.log(logging.WARNING if failed else logging.INFO, "undo on tick: %s", detail)

    def _announcer(self) -> Callable[[Decision], None] | None:
        """Where a timer writes a deferred SIGKILL's intent: the write-ahead sink, if any."""
        if not writes_ahead(self._sink):
            return None

        def announce(decision: Decision) -> None:
            self.stats[f"decision-{decision.outcome}"] += 1
            self._sink.record(decision)

        return announce

    def _sweep_budget(self, now: float) -> int:
        """How many offenders this tick looks at: all of them when few; else enough that a
        full pass takes at most SWEEP_PERIOD_S, and never fewer than SWEEP_MIN."""
        elapsed = SWEEP_PERIOD_S if self._swept_at is None else now - self._swept_at
        self._swept_at = now
        tracked = len(self._offenders)
        share = math.ceil(tracked * min(1.0, max(0.0, elapsed) / SWEEP_PERIOD_S))
        return min(tracked, max(SWEEP_MIN, share))

    def _sweep(self, key: OffenderKey, offender: Offender, now: float) -> None:
        """Judge, cool down or release one offender whose time has come."""
        policy = self._by_name[offender.policy]
        handle = offender.subject.handle
        exited = handle is not None and _gone(handle)
        judge = offender.judge_at
        if offender.state == "cooldown" and judge is not None and now >= judge and not exited:
            self._judge(offender, policy, now)
        else:
            cooled = offender.state == "cooldown" and (now >= offender.cooldown_until or exited)
            if cooled:
                fire(offender, "cooled")
            went_on = (
                offender.state == "observed"
                and not exited
                and self._remeasure(offender, policy, now)
            )
            quiet = now - offender.last_seen >= policy.release_after_s
            if offender.state == "observed" and (quiet or exited):
                self._release(key, offender)
            elif not cooled and not went_on:
                return  # nothing changed: its place among the idle stays as it was
        self._refile(key[:2])  # out of cooldown, or released: evictable now, or gone

    def _follow_up(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            self.stats[f"decision-{decision.outcome}"] += 1
            self._sink.record(decision)

    def _judge(self, offender: Offender, policy: Policy, now: float) -> None:
        """The step's settle time is over: re-measure the signal. Recovered → take back what
        the playbook changed and start over from its first step; still offending (or a timed
        stage without `until`) → escalate now, through the same guards as a fresh record."""
        record, below = offender.last_record, offender.until_below
        offender.judge_at = None
        if record is None:
            return
        # Without `until`, a step with a settle time is a timed stage: the offender is still
        # there when it ends, so the ladder goes on (stop, then terminate).
        value = None
        if below is not None and self._sensor is not None:
            value = self._sensor.measure(record)
        fire(offender, "cooled")
        if below is not None and value is not None and value < below:
            reverted = (
                self._undo.revert_offender(offender.subject, "recovered") if self._undo else []
            )
            offender.step = 0
            self._end_incident(offender)  # recovered: a new crossing is a new incident
            self.stats["recovered"] += 1
            case = self._case(policy, dataclasses.replace(record, count=value), offender)
            detail = "; ".join(reverted) if reverted else "nothing to revert"
            self._emit(
                case, RECOVERED, f"{record.signal} at {value} < {below} after settling", detail
            )
            return
        measured = record if value is None else dataclasses.replace(record, count=value)
        # Records of this signal were lost since (the taint lasts two windows): judge the
        # escalation as degraded, whatever the judged record said.
        if now - self._degraded_at.get(record.signal, -math.inf) < 2 * record.window_s:
            measured = dataclasses.replace(measured, degraded=True)
        self._evaluate(policy, measured, offender.subject)

    def _case(self, policy: Policy, record: SensorRecord, offender: Offender) -> _Case:
        """The offender's next step (past the last, the last repeats), with the scope it acts
        in (the step's own, else the policy's) and whether it may act at all."""
        playbook = self.policies.playbook_for(policy)
        index = min(offender.step, len(playbook.steps) - 1)
        step = playbook.steps[index]
        if offender.subject.is_cgroup:
            # The offender is the cgroup: every step acts on it (the loader refuses a process
            # scope here; a tree's reach is the cgroup's subtree, which cgroup scope acts on).
            if step.scope != "cgroup":
                step = dataclasses.replace(step, scope="cgroup")
        elif not step.scope_set and step.scope != policy.scope:
            step = dataclasses.replace(step, scope=policy.scope)
        demoted = self._breakers.demoted(policy.name) is not None
        dry_run = self.dry_run or policy.dry_run or demoted
        return _Case(policy, record, offender, step, index, dry_run, facts_of(offender.subject))

    def _release(
        self, key: tuple[int, int, str], offender: Offender, *, revert: bool = True
    ) -> None:
        fire(offender, "release")
        self.stats["released"] += 1
        self._end_incident(offender)
        failure: Exception | None = None
        if revert and self._undo is not None:
            # Quiet for release_after (or gone): it recovered. Take back what was changed.
            # A revert that raises (a full journal) must not leave a released offender in the
            # table for ever, holding its pidfd: the records stay in the journal, retried.
            try:
                for detail in self._undo.revert_offender(offender.subject, "released"):
                    log.info("reverted on release of pid %d: %s", offender.subject.pid, detail)
            except Exception as err:
                failure = err
        try:
            self._executor.release(offender.subject)
        except ActionError as err:
            log.warning("release of pid %d: %s", offender.subject.pid, err)
        detach(self._machine, offender)
        del self._offenders[key]
        self._holders.discard(key)
        skey = key[:2]
        group = self._by_subject[skey]
        del group[offender.policy]
        if not group:
            del self._by_subject[skey]
            self._idle.pop(skey, None)
            self._unpin(offender.subject)
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Release every offender (closes pidfds); take back every change unless told to keep
        them (they stay in the journal, with their TTLs, for the next start to honour)."""
        # Every stage runs whatever an earlier one raised (a full journal): each offender is
        # released and its pidfd closed; the first error is raised at the end.
        failure: Exception | None = None
        try:
            if self._timed is not None:
                self._follow_up(self._timed.close(self._announcer()))
        except Exception as err:
            failure = err
        try:
            if self._undo is not None and not self._keep_on_close:
                for detail in self._undo.revert_all("agent shutdown"):
                    log.info("reverted on shutdown: %s", detail)
        except Exception as err:
            failure = failure or err
        for key, offender in list(self._offenders.items()):
            if offender.state in ("suspect", "offending", "remediating"):
                fire(offender, "hold")
            if offender.state == "cooldown":
                fire(offender, "cooled")
            try:
                self._release(key, offender, revert=not self._keep_on_close)
            except Exception as err:
                failure = failure or err
        if failure is not None:
            raise failure


def _gone(handle: Handle) -> bool:
    """Exited, or its pidfd was lost (closed behind its back): either way nothing can be done
    to it through the pin any more, so it is released like an exited one (a revert pins anew)."""
    try:
        return handle.has_exited()
    except IdentityUnverified as err:
        log.error("offender pid lost its pin: %s", err)
        return True


def _holds_fd(subject: Subject) -> bool:
    """A process offender's pin is a pidfd; a cgroup offender's holds no descriptor."""
    return subject.handle is not None and not subject.is_cgroup


def _evictable(offender: Offender) -> bool:
    """Idle with nothing applied: forgetting it loses only what its next record relearns."""
    return offender.state == "observed" and not offender.applied
