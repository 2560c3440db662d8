"""The alert index is O(1) per decision (issue 11, item 4): a decision finds the incident it
opens, repeats or (pid reused) resolves without scanning every open incident."""

from __future__ import annotations

import sys
from typing import Any

from remedy.engine.decisions import Decision
from remedy.service.alerts import Alerter


def decision(pid: int, start: int) -> Decision:
    return Decision(
        time=1.0, policy="fork", signal="fork_rate", pid=pid, start_ticks=start, comm="bomb",
        ppid=1, exe=None, cgroup="/test", count=300, window_s=1.0, action="kill", step=0,
        dry_run=True, outcome="would-act", reason="monitor mode", message="would kill",
        state="cooldown",
    )  # fmt: skip


def lines_run(alerter: Alerter, d: Decision) -> int:
    """Python lines run to take one decision (a loop's every pass counts): work, not time."""
    count = [0]

    def tracer(frame: Any, event: str, arg: object) -> Any:
        count[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        alerter.record(d)
    finally:
        sys.settrace(None)
    return count[0]


def test_a_decision_costs_the_same_with_100_or_10000_open_incidents() -> None:
    alerter = Alerter((), clock=lambda: 1_000.0)
    try:
        work: dict[int, tuple[int, int]] = {}
        pid = 1
        for size in (100, 10_000):
            while pid <= size:
                alerter.record(decision(pid, 1))
                pid += 1
            assert len(alerter.open_incidents) == size
            # A new incident, and a reused pid (which resolves the earlier process's).
            reused = decision(size // 2, 2)
            work[size] = (lines_run(alerter, decision(pid, 1)), lines_run(alerter, reused))
            pid += 1
        assert work[10_000] == work[100], work
        assert alerter.stats.resolved == 2  # each reused pid's earlier process
        assert ("fork", 50, 1) not in alerter.open_incidents
        assert ("fork", 50, 2) in alerter.open_incidents
    finally:
        alerter.close()


def test_a_reused_pid_resolves_only_its_own_policys_earlier_incident() -> None:
    alerter = Alerter((), clock=lambda: 1_000.0)
    try:
        alerter.record(decision(7, 1))
        alerter.record(decision(8, 1))
        alerter.record(decision(7, 2))
        assert sorted(alerter.open_incidents) == [("fork", 7, 2), ("fork", 8, 1)]
        assert alerter.stats.resolved == 1
        alerter.record(decision(7, 2))  # the same incident: nothing changes
        assert alerter.stats.fired == 3 and alerter.stats.resolved == 1
    finally:
        alerter.close()
