"""A decision is what the engine did, or would have done, about one record: one audit line."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from remedy.errors import ActionError

# Outcomes: what happened. Reasons say why, in words.
ACTED = "acted"
WOULD_ACT = "would-act"
SKIPPED = "skipped"
RECOVERED = "recovered"  # a step's `until` held after settling: changes taken back
BREAKER_TRIPPED = "breaker-tripped"  # an alert: the policy was demoted to monitor mode
# Write-ahead: written (and fsynced) before a step that can end a process runs; the decision
# after it is its outcome. An intent with no outcome means the agent died in between.
INTENT = "intent"
# An irreversible step refused because its intent could not be made durable (docs/audit.md).
AUDIT_UNAVAILABLE = "audit-unavailable"


class AuditUnavailable(ActionError):
    """A sink could not make an ``intent`` durable, so the irreversible step it announces must
    not run: the engine refuses the step with this outcome, as it does any failed action.
    Raised by :meth:`DecisionSink.record` for intents only; every other decision a sink cannot
    store is reported (logged, counted) and the engine goes on deciding."""

    outcome = AUDIT_UNAVAILABLE


@dataclass(frozen=True)
class Decision:
    """One audit record. ``outcome`` is acted, would-act, skipped, intent, audit-unavailable,
    or an action error outcome (gone, denied, cgroup-error, error)."""

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
    """Where decisions go: the audit log, the console, a test's list.

    A sink that keeps a durable record says so with a true ``write_ahead`` attribute: only
    such sinks are sent :data:`INTENT` decisions (see :func:`writes_ahead`), and their
    ``record`` of an intent returns only once it is durable, or raises
    :class:`AuditUnavailable`. For any other decision ``record`` must not raise for a storage
    fault: it reports the fault and the engine goes on deciding."""

    def record(self, decision: Decision) -> None: ...


def writes_ahead(sink: DecisionSink) -> bool:
    """Whether ``sink`` takes intents: the engine announces a step that can end a process to
    it, and runs the step only if the announcement was stored."""
    return getattr(sink, "write_ahead", False) is True
