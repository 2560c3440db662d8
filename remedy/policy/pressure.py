"""Checks of pressure-signal policies (cpu_pressure, memory_pressure, io_pressure), called by
the loader so that each problem gets the policy's file and the line of its key.

A pressure policy's ``threshold`` is the percent of ``window`` stalled, and ``window`` is the
PSI trigger's window, which the kernel bounds to 500 ms..10 s (kernel/sched/psi.c).
"""

from __future__ import annotations

from typing import Any

from remedy.policy.model import Playbook, Policy, Pressure
from remedy.policy.schema import PolicyDoc, PressureDoc
from remedy.sensors.catalog import SIGNALS

__all__ = ["host_playbook_problem", "is_pressure_signal", "pressure_of", "pressure_problems"]

_WINDOW_MIN_S = 0.5
_WINDOW_MAX_S = 10.0


def is_pressure_signal(signal: str) -> bool:
    return signal in SIGNALS and SIGNALS[signal].section == "psi"


def pressure_problems(spec: PolicyDoc, data: dict[Any, Any]) -> list[tuple[str, str]]:
    """(key, message) for everything wrong with ``spec`` as a pressure policy (or with a
    ``pressure:`` on another signal)."""
    if not is_pressure_signal(spec.signal):
        if spec.pressure is not None:
            return [("pressure", f"pressure: is only for pressure signals, not {spec.signal}")]
        return []
    problems: list[tuple[str, str]] = []
    given = spec.pressure or PressureDoc()
    if not _WINDOW_MIN_S <= spec.window <= _WINDOW_MAX_S:
        problems.append(
            (
                "window",
                f"a pressure window is 500ms to 10s (the kernel's PSI trigger limits), "
                f"not {spec.window:g}s",
            )
        )
    if spec.threshold > 100:
        problems.append(
            (
                "threshold",
                f"{spec.signal}'s threshold is the percent of the window stalled (1-100), "
                f"not {spec.threshold}",
            )
        )
    for key in ("for", "sustain"):
        if key in data and data[key] != 1:
            problems.append(
                (key, f"{spec.signal} has no '{key}': the kernel's trigger sees one window")
            )
    selects = any(getattr(spec.match, f) for f in ("cgroups", "containers", "pods"))
    if given.scope == "host":
        if selects:
            problems.append(
                ("match", "a host pressure policy watches /proc/pressure: it selects no cgroups")
            )
        if given.offender == "heaviest":
            problems.append(
                (
                    "pressure.offender",
                    "the offender of host pressure is the host, which remedy only notifies "
                    "about; offender: heaviest picks within a cgroup (scope: cgroup)",
                )
            )
    elif not spec.match.cgroups:
        problems.append(
            (
                "match.cgroups",
                f"{spec.signal} with scope cgroup arms one trigger per cgroup: name them with "
                "match: cgroups: (globs on cgroup2 paths, e.g. /system.slice/*); scope: host "
                "watches the whole host",
            )
        )
    return problems


def pressure_of(spec: PolicyDoc) -> Pressure | None:
    """The model record of a checked pressure policy; None for other signals."""
    if not is_pressure_signal(spec.signal):
        return None
    given = spec.pressure or PressureDoc()
    return Pressure(stall=given.stall, scope=given.scope, offender=given.offender)


def host_playbook_problem(policy: Policy, playbook: Playbook) -> str | None:
    """The host is no cgroup or process remedy may act on: a host pressure policy notifies."""
    if policy.pressure is None or policy.pressure.scope != "host":
        return None
    acting = [f"{i + 1} ({s.action})" for i, s in enumerate(playbook.steps) if s.action != "notify"]
    if not acting:
        return None
    return (
        f"{policy.signal} with scope host is about the whole host, which remedy only notifies "
        f"about; step(s) {', '.join(acting)} of playbook {playbook.name!r} in {playbook.file} "
        "would act (use notify steps, or scope: cgroup with offender: heaviest)"
    )
