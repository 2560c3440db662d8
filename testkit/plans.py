"""Sensor plans for tests: one tier per signal, the shape every sensor had before issue 12."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from remedy.compiler import SensorPlan, SignalPlan, Tier, WindowClass

__all__ = ["Filter", "plan_of"]


@dataclass(frozen=True)
class Filter:
    """One signal's single tier."""

    window_s: float
    threshold: int
    sustain: int = 1
    lifetime_s: float = 0.1
    cgroups: tuple[str, ...] = ()


def plan_of(filters: Mapping[str, Filter], generation: int = 1) -> SensorPlan:
    """A plan with one tier per signal, rule ids 1, 2, … in the mapping's order."""
    signals = {
        name: SignalPlan(
            name,
            (
                WindowClass(
                    0, f.window_s, (Tier(rule, f"p-{name}", f.threshold, f.sustain, f.cgroups),)
                ),
            ),
            lifetime_s=f.lifetime_s,
        )
        for rule, (name, f) in enumerate(filters.items(), start=1)
    }
    return SensorPlan(signals, generation)
