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
from remedy.sensors.catalog import CATALOGUE

__all__ = ["SIGNALS", "Playbook", "Policy", "PolicySet", "RateLimit", "Selector", "Step"]

#: Signals a policy can watch: the catalogue in remedy/sensors/catalog.py.
SIGNALS: tuple[str, ...] = tuple(s.name for s in CATALOGUE)


@dataclass(frozen=True)
class RateLimit:
    """At most ``max_actions`` actions per policy in any sliding window of ``per_s`` seconds."""

    max_actions: int  # >= 1
    per_s: float  # > 0


@dataclass(frozen=True)
class Selector:
    """Which processes a policy applies to. An empty tuple matches anything."""

    cgroups: tuple[str, ...] = ()  # fnmatch globs on the cgroup path, e.g. "/system.slice/*"
    comms: tuple[str, ...] = ()  # exact comm names (at most 15 bytes, as the kernel truncates)

    def matches(self, cgroup: str, comm: str) -> bool:
        """True when ``cgroup`` matches one of the globs and ``comm`` is one of the names.

        Globs are matched case-sensitively on every platform (cgroup paths are), and ``*`` also
        matches ``/``, so ``/system.slice/*`` covers nested cgroups too.
        """
        if self.cgroups and not any(fnmatchcase(cgroup, glob) for glob in self.cgroups):
            return False
        return not self.comms or comm in self.comms


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
    sustain: int = 1  # consecutive crossing windows before a record counts (cpu runaway: K)
    lifetime_s: float = 0.1  # churn: children that exit sooner than this are short-lived


@dataclass(frozen=True)
class Step:
    """One rung of a playbook's escalation ladder: an action and its validated parameters."""

    action: str  # a key of remedy.actions.params.PARAMS
    params: ActionParams  # an instance of PARAMS[action]


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
    unique, and at most one policy watches each signal.
    """

    policies: tuple[Policy, ...]
    playbooks: Mapping[str, Playbook]
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
