"""A decision is what the engine did, or would have done, about one record: one audit line."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

# Outcomes: what happened. Reasons say why, in words.
ACTED = "acted"
WOULD_ACT = "would-act"
SKIPPED = "skipped"
RECOVERED = "recovered"  # a step's `until` held after settling: changes taken back
BREAKER_TRIPPED = "breaker-tripped"  # an alert: the policy was demoted to monitor mode


@dataclass(frozen=True)
class Decision:
    """One audit record. ``outcome`` is acted, would-act, skipped, or an action error outcome
    (gone, denied, cgroup-error, error)."""

    time: float
    policy: str
    signal: str
    pid: int
    start_ticks: int
    comm: str
    ppid: int
    exe: str | None
    cgroup: str
    count: int
    window_s: float
    action: str | None
    step: int
    dry_run: bool
    outcome: str
    reason: str
    message: str
    state: str
    degraded: bool = False  # records were lost around this window
    context: dict[str, Any] | None = None  # container, exe, cmdline, uid, parent chain
    stack: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The audit line: every field, plus ``ts``, the time in ISO 8601 UTC for humans."""
        data = asdict(self)
        data["ts"] = datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds")
        return data


class DecisionSink(Protocol):
    """Where decisions go: the audit log, the console, a test's list."""

    def record(self, decision: Decision) -> None: ...
