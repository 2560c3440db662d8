"""The sensor plan: what every sensor, replay and the engine's routing are told to watch.

The compiler (:mod:`remedy.compiler.compile`) is the only place that turns policies into this;
nothing else derives kernel settings from policies. Plain frozen records, like the policy IR.

Shape, per signal::

    SignalPlan(fork_rate)
      WindowClass(1 s)                 tiers of equal window length share one kernel window
        Tier(rule 1, "fork-notify",  threshold 100, everywhere)
        Tier(rule 2, "fork-ci",      threshold 300, cgroups ["/ci/*"])
      WindowClass(5 s)
        Tier(rule 3, "fork-slow",    threshold 900, everywhere)

A record from any sensor names the rule (``SensorRecord.rule``) and the plan ``generation`` its
tier was written with, so the engine routes it to exactly one policy, and a record still in flight
across a reload is routed by the plan that produced it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "MAX_CGROUP_RULES",
    "MAX_CLASSES",
    "MAX_TIERS",
    "FastPathRule",
    "SensorPlan",
    "SignalPlan",
    "Tier",
    "WindowClass",
]

#: Per signal: tiers (a u8 bitmask of tiers emitted per window; 8 keeps one window at 64 bytes)
#: and window classes (each an update per event, so few). KEEP IN SYNC with bpf/remedy.bpf.c.
MAX_TIERS = 8
MAX_CLASSES = 4
#: (signal, cgroup) entries of the kernel's per-cgroup rule map.
MAX_CGROUP_RULES = 4096


@dataclass(frozen=True)
class FastPathRule:
    """In-kernel enforcement at a tier's threshold: the kernel signals the forker itself on every
    fork at or over the threshold (fork_rate only), with no user-space round trip."""

    signal: int  # the Unix signal number (9 SIGKILL, 19 SIGSTOP)
    dry_run: bool


@dataclass(frozen=True)
class Tier:
    """One policy's rule on one signal: its own threshold, sustain and rule id."""

    rule: int  # >= 1, unique within a plan; 0 means "no rule" on the wire
    policy: str  # the policy this tier routes to
    threshold: int  # in the signal's unit (catalogue), as the policy wrote it
    sustain: int = 1
    cgroups: tuple[str, ...] = ()  # globs on the keyed hierarchy's paths; empty: everywhere
    fastpath: FastPathRule | None = None

    @property
    def everywhere(self) -> bool:
        return not self.cgroups


@dataclass(frozen=True)
class WindowClass:
    """Tiers of one signal with the same window length: counted in one kernel window."""

    index: int  # 0 .. MAX_CLASSES-1, stable within a plan
    window_s: float
    tiers: tuple[Tier, ...]  # ascending threshold (then rule), at most MAX_TIERS per signal


@dataclass(frozen=True)
class SignalPlan:
    """Everything one signal's filter holds."""

    signal: str
    classes: tuple[WindowClass, ...]
    lifetime_s: float = 0.1  # churn: children that exit sooner than this are short-lived

    def tiers(self) -> Iterator[tuple[WindowClass, Tier]]:
        for cls in self.classes:
            for tier in cls.tiers:
                yield cls, tier

    @property
    def slots(self) -> tuple[Tier, ...]:
        """Tiers in kernel slot order (the bit a tier has in the emitted mask is its position)."""
        return tuple(t for _, t in self.tiers())

    def slot_of(self, rule: int) -> int:
        return next(i for i, t in enumerate(self.slots) if t.rule == rule)


@dataclass(frozen=True)
class SensorPlan:
    """What the sensors watch, by signal, and how records route back to policies."""

    signals: Mapping[str, SignalPlan]
    generation: int = 1  # bumped by every compile that replaces a running plan
    _rules: Mapping[int, tuple[str, WindowClass, Tier]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        rules = {
            tier.rule: (name, cls, tier)
            for name, sp in self.signals.items()
            for cls, tier in sp.tiers()
        }
        object.__setattr__(self, "_rules", rules)

    def rule(self, rule: int) -> tuple[str, WindowClass, Tier] | None:
        """(signal, window class, tier) of a rule id; None for an id this plan does not have."""
        return self._rules.get(rule)

    def policy_of(self, rule: int) -> str | None:
        found = self._rules.get(rule)
        return found[2].policy if found else None

    def tiers_of(self, policy: str) -> list[tuple[str, WindowClass, Tier]]:
        return [r for r in self._rules.values() if r[2].policy == policy]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.signals))
