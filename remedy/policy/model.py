"""Policies and playbooks as plain, frozen records: what the loader produces and the engine reads.

These carry no behaviour beyond tiny lookups; validation happens once, in the loader, so that
everything downstream can trust every field (see the invariants noted on each field).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from remedy.actions.params import ActionParams
from remedy.policy.regex import CmdlinePattern, compile_cmdline
from remedy.sensors.catalog import SIGNALS as _CATALOGUE_SIGNALS

__all__ = [
    "NOTHING",
    "SCOPES",
    "SEVERITIES",
    "SIGNALS",
    "Breaker",
    "Facts",
    "Playbook",
    "Policy",
    "PolicySet",
    "Pressure",
    "RateLimit",
    "Selector",
    "Silence",
    "Step",
]

#: Severities, lowest first. When several policies match one offender, the higher severity
#: takes precedence (then load order): see docs/policies.md.
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")

#: What an action reaches: the offending process; it and its descendants; or every process of
#: its cgroup (a bomb spread over many pids, a container gone wrong).
SCOPES: tuple[str, ...] = ("process", "tree", "cgroup")

#: Signals a policy can watch: the catalogue in remedy/sensors/catalog.py.
SIGNALS: tuple[str, ...] = tuple(_CATALOGUE_SIGNALS)


@dataclass(frozen=True)
class RateLimit:
    """At most ``max_actions`` actions per policy in any sliding window of ``per_s`` seconds."""

    max_actions: int  # >= 1
    per_s: float  # > 0


@dataclass(frozen=True)
class Facts:
    """What selectors test about a process: read once when its record is enriched."""

    cgroup: str  # cgroup path, "/a/b"
    comm: str
    exe: str | None = None
    cmdline: str = ""
    uid: int = -1  # -1: unknown
    container_id: str | None = None
    pod_uid: str | None = None


@dataclass(frozen=True)
class Selector:
    """Which processes a policy applies to (``match:``) or never applies to (``exclude:``).

    Every non-empty field must match (AND across fields, OR within one). An empty selector
    matches anything. Nothing is ever a substring match except the ``cmdlines`` regexes, which
    are explicit: names and paths are exact, cgroups are globs.
    """

    cgroups: tuple[str, ...] = ()  # fnmatch globs on the cgroup path, e.g. "/system.slice/*"
    comms: tuple[str, ...] = ()  # exact comm names (at most 15 bytes, as the kernel truncates)
    exes: tuple[str, ...] = ()  # exact executable paths
    cmdlines: tuple[str, ...] = ()  # RE2 regexes searched in the command line (see regex.py)
    uids: tuple[int, ...] = ()  # numeric uids (user names are resolved at load)
    containers: tuple[str, ...] = ()  # container ids, full or the 12-character short id
    pods: tuple[str, ...] = ()  # Kubernetes pod uids
    # ``cmdlines`` compiled once, here: a selector that exists can match in linear time, and a
    # pattern RE2 refuses can never reach a decision (RegexError, a ValueError, at build).
    _patterns: tuple[CmdlinePattern, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_patterns", tuple(compile_cmdline(r) for r in self.cmdlines))

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.cgroups,
                self.comms,
                self.exes,
                self.cmdlines,
                self.uids,
                self.containers,
                self.pods,
            )
        )

    def mismatch(self, facts: Facts) -> str | None:
        """The first field that does not match, as words ("comm 'x' not in [...]"), or None."""
        if self.cgroups and not any(fnmatchcase(facts.cgroup, g) for g in self.cgroups):
            return f"cgroup {facts.cgroup!r} matches none of {list(self.cgroups)}"
        if self.comms and facts.comm not in self.comms:
            return f"comm {facts.comm!r} not in {list(self.comms)}"
        if self.exes and facts.exe not in self.exes:
            return f"exe {facts.exe!r} not in {list(self.exes)}"
        if self._patterns and not any(p.search(facts.cmdline) for p in self._patterns):
            return f"command line matches none of {list(self.cmdlines)}"
        if self.uids and facts.uid not in self.uids:
            return f"uid {facts.uid} not in {list(self.uids)}"
        cid = facts.container_id or ""
        if self.containers and not any(c in (cid, cid[:12]) for c in self.containers if cid):
            return f"container {cid[:12] or 'none'} not in {list(self.containers)}"
        if self.pods and facts.pod_uid not in self.pods:
            return f"pod {facts.pod_uid or 'none'} not in {list(self.pods)}"
        return None

    def matches(self, facts: Facts | str, comm: str | None = None) -> bool:
        """True when every given field matches. ``matches(cgroup, comm)`` is the short form."""
        if isinstance(facts, str):
            facts = Facts(cgroup=facts, comm=comm or "")
        return self.mismatch(facts) is None


NOTHING = Selector()  # an empty exclude: excludes nothing


@dataclass(frozen=True)
class Breaker:
    """A policy that acts on more than ``max_offenders`` distinct offenders (or executables, or
    cgroups) within ``per_s`` is demoted to monitor mode and raises an alert: a bad policy must
    not become the outage."""

    max_offenders: int = 20
    per_s: float = 600.0


@dataclass(frozen=True)
class Silence:
    """A maintenance window: no actions for matching processes until ``expires`` (epoch
    seconds). Sensing and auditing continue; decisions say who silenced them and why."""

    name: str
    file: Path
    match: Selector
    author: str
    reason: str
    expires: float  # wall-clock seconds since the epoch
    policies: tuple[str, ...] = ()  # empty: every policy

    def applies(self, policy: str, facts: Facts, now_wall: float) -> bool:
        return (
            now_wall < self.expires
            and (not self.policies or policy in self.policies)
            and self.match.matches(facts)
        )


@dataclass(frozen=True)
class Pressure:
    """``pressure:`` of a pressure-signal policy (docs/psi.md): which PSI line the trigger
    watches, where, and who the offender is. The stall threshold is the policy's ``threshold``
    (percent of ``window``, which is the PSI window: 500 ms to 10 s)."""

    stall: str = "some"  # "some": at least one task stalled; "full": all non-idle tasks
    scope: str = "cgroup"  # "cgroup": the cgroups ``match.cgroups`` names; "host": the host
    offender: str = "cgroup"  # "cgroup", or "heaviest": its heaviest unprotected process


@dataclass(frozen=True)
class Policy:
    """When a signal crosses a threshold for a process, run a playbook against it."""

    name: str
    file: Path  # where it was defined, for messages and the audit log
    signal: str  # one of SIGNALS
    threshold: int  # >= 1, in the signal's unit (catalogue: events per window, %, MiB)
    window_s: float  # > 0
    playbook: str  # name of a Playbook in the same PolicySet
    dry_run: bool
    cooldown_s: float  # >= 0: after an action, no new action for this offender for this long
    release_after_s: float  # > window_s: an offender quiet this long is released and forgotten
    rate_limit: RateLimit
    match: Selector
    description: str = ""
    sustain: int = 1  # YAML `for`: consecutive crossing windows before a record counts
    lifetime_s: float = 0.1  # churn: children that exit sooner than this are short-lived
    severity: str = "warning"  # one of SEVERITIES; decides precedence between policies
    exclude: Selector = field(default_factory=lambda: NOTHING)  # never act on these
    breaker: Breaker = field(default_factory=Breaker)
    scope: str = "process"  # one of SCOPES: the process, its tree, or its whole cgroup
    kernel: str | None = None  # "kill" / "stop": the kernel enforces at the threshold itself
    pressure: Pressure | None = None  # set exactly for the pressure signals (psi.py)

    @property
    def mode(self) -> str:
        """``monitor`` (dry-run: decide and audit, never act) or ``enforce``."""
        return "monitor" if self.dry_run else "enforce"

    def applies_to(self, facts: Facts) -> str | None:
        """Why this policy does not apply to ``facts``, or None when it does."""
        why = self.match.mismatch(facts)
        if why is not None:
            return f"match: {why}"
        if not self.exclude.empty and self.exclude.mismatch(facts) is None:
            return "excluded by exclude:"
        return None


@dataclass(frozen=True)
class Step:
    """One rung of a playbook's escalation ladder: an action and its validated parameters."""

    action: str  # a key of remedy.actions.params.PARAMS
    params: ActionParams  # an instance of PARAMS[action]
    scope: str = "process"  # what the action reaches; the step's own, else the policy's
    scope_set: bool = False  # the playbook gave this step a scope (it wins over the policy's)
    settle_s: float = 0.0  # wait this long after the step before judging whether it helped
    until_below: int | None = None  # recovered when the signal's window value is below this
    ttl_s: float = 3600.0  # a reversible change is undone at the latest after this long
    kernel: bool = False  # kill/stop: arm the in-kernel fast path (signal at the next fork)


@dataclass(frozen=True)
class Playbook:
    """Named escalation ladder: the engine runs ``steps[0]`` first and escalates from there."""

    name: str
    file: Path
    steps: tuple[Step, ...]  # at least one


@dataclass(frozen=True)
class PolicySet:
    """Every policy and playbook of one configuration, cross-checked by the loader.

    Invariant (when built by the loader): every policy's playbook is in ``playbooks``, names are
    unique, and the set compiles (:func:`remedy.compiler.plan_problems` finds nothing).
    """

    policies: tuple[Policy, ...]
    playbooks: Mapping[str, Playbook]
    silences: tuple[Silence, ...] = ()
    protected_exes: frozenset[str] = frozenset()  # added to the built-in protected set
    # Who may own each of those paths' processes, from the Protection documents' ``user:``;
    # a path missing here (or a document without ``user:``): root only.
    protected_owners: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # The engine asks for_signal() on every record, so the grouping is computed once here.
    _by_signal: Mapping[str, tuple[Policy, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        by_signal: dict[str, tuple[Policy, ...]] = {}
        for policy in self.policies:
            by_signal[policy.signal] = (*by_signal.get(policy.signal, ()), policy)
        object.__setattr__(self, "_by_signal", by_signal)

    def playbook_for(self, policy: Policy) -> Playbook:
        """The playbook ``policy`` names. KeyError only for sets not built by the loader."""
        try:
            return self.playbooks[policy.playbook]
        except KeyError:
            raise KeyError(
                f"policy {policy.name!r} names unknown playbook {policy.playbook!r}"
            ) from None

    def for_signal(self, signal: str) -> tuple[Policy, ...]:
        """The policies watching ``signal``, in load order; empty if none."""
        return self._by_signal.get(signal, ())
