"""Alerts: one per incident, fired on its first action and resolved when the offender is gone.

An incident is one process (pid and start time) under one policy. It fires on the first acted,
would-act or breaker-tripped decision; later decisions about it change nothing, so a storm of
records is one alert, not a storm of alerts. The engine emits no "released" decision, so the
``Alerter`` is also an observer: an incident whose offender left the agent's snapshot (released,
or the process exited) is resolved.

Open incidents are re-sent, unchanged, every ``repeat_s``, with ``endsAt`` a few repeats ahead
(as Prometheus does): a receiver keeps an alert firing while the agent lives, and an agent that
dies cannot leave an alert firing forever.

Sending happens on one background thread behind a bounded queue, so a slow or unreachable
receiver never blocks the engine's worker. Network errors are logged and counted, never raised.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from remedy.engine.decisions import ACTED, AUDIT_UNAVAILABLE, BREAKER_TRIPPED, WOULD_ACT, Decision
from remedy.status import AgentSnapshot

__all__ = [
    "ALERTNAME",
    "Alert",
    "AlertTarget",
    "Alerter",
    "AlertmanagerTarget",
    "LogTarget",
    "WebhookTarget",
]

log = logging.getLogger(__name__)

ALERTNAME = "RemedyOffender"
# audit-unavailable: a step that would end a process was refused because the audit could not
# take its intent; someone must free the disk (issue 11: "loudly: stderr, metric, alert").
FIRING_OUTCOMES = frozenset({ACTED, WOULD_ACT, BREAKER_TRIPPED, AUDIT_UNAVAILABLE})
IncidentKey = tuple[str, int, int]  # policy, pid, start_ticks


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Alert:
    """One alert as Alertmanager's API v2 takes it. ``ends_at`` in the past means resolved."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float
    resolved: bool = False
    generator_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A postableAlert (api/v2/openapi.yaml)."""
        data: dict[str, Any] = {
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": _rfc3339(self.starts_at),
            "endsAt": _rfc3339(self.ends_at),
        }
        if self.generator_url:
            data["generatorURL"] = self.generator_url
        return data


class AlertTarget(Protocol):
    """Where alerts go. ``send`` may block and may raise; the Alerter calls it from its
    sending thread and counts failures."""

    def send(self, alerts: Sequence[Alert]) -> None: ...


def _post_json(url: str, payload: Any, timeout_s: float) -> None:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


@dataclass(frozen=True)
class AlertmanagerTarget:
    """Prometheus Alertmanager: POST ``{url}/api/v2/alerts``."""

    url: str
    timeout_s: float = 5.0

    def send(self, alerts: Sequence[Alert]) -> None:
        _post_json(
            self.url.rstrip("/") + "/api/v2/alerts", [a.to_json() for a in alerts], self.timeout_s
        )


@dataclass(frozen=True)
class WebhookTarget:
    """Any HTTP endpoint: POST the same JSON list Alertmanager gets, plus ``status``."""

    url: str
    timeout_s: float = 5.0

    def send(self, alerts: Sequence[Alert]) -> None:
        payload = [
            {**a.to_json(), "status": "resolved" if a.resolved else "firing"} for a in alerts
        ]
        _post_json(self.url, payload, self.timeout_s)


@dataclass
class LogTarget:
    """One line per alert on a stream (the console, a file)."""

    stream: TextIO

    def send(self, alerts: Sequence[Alert]) -> None:
        for a in alerts:
            labels = " ".join(f"{k}={v}" for k, v in sorted(a.labels.items()) if k != "alertname")
            status = "RESOLVED" if a.resolved else "FIRING"
            summary = a.annotations.get("summary", "")
            print(f"alert {status} {a.labels['alertname']} {labels}: {summary}", file=self.stream)
        self.stream.flush()


@dataclass
class AlertStats:
    """What the Alerter did."""

    fired: int = 0
    resolved: int = 0
    repeated: int = 0
    sent: int = 0  # deliveries that succeeded (one per target per batch)
    failed: int = 0  # deliveries that raised: network errors, HTTP errors
    dropped: int = 0  # batches dropped because the sending queue was full


@dataclass
class _Incident:
    alert: Alert
    last_sent: float
    seen: bool = field(default=False)  # the offender has been in a snapshot


class Alerter:
    """A DecisionSink and an Observer that turns incidents into alerts for ``targets``."""

    def __init__(
        self,
        targets: Sequence[AlertTarget],
        *,
        host: str | None = None,
        repeat_s: float = 300.0,
        queue_size: int = 256,
        generator_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._targets = tuple(targets)
        self._host = host or socket.gethostname()
        self._repeat_s = repeat_s
        self._generator_url = generator_url
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[IncidentKey, _Incident] = {}
        # The open incident of each (policy, pid): a decision finds the one a reused pid ends
        # in O(1), not by scanning every open incident (issue 11). At most one: opening a new
        # one resolves the earlier.
        self._by_pid: dict[tuple[str, int], IncidentKey] = {}
        self._queue: queue.Queue[list[Alert] | None] = queue.Queue(maxsize=queue_size)
        self.stats = AlertStats()
        self._thread = threading.Thread(target=self._send_loop, name="remedy-alerts", daemon=True)
        self._thread.start()

    @property
    def open_incidents(self) -> list[IncidentKey]:
        with self._lock:
            return list(self._open)

    # -- DecisionSink ---------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        """Fire on an incident's first acted, would-act, breaker-tripped or audit-unavailable
        decision."""
        if decision.outcome not in FIRING_OUTCOMES:
            return
        key = (decision.policy, decision.pid, decision.start_ticks)
        now = self._clock()
        batch: list[Alert] = []
        with self._lock:
            if key in self._open:
                return  # the incident is already open: no alert storms
            # The pid was reused: the earlier process under this policy is gone.
            other = self._by_pid.get((decision.policy, decision.pid))
            if other is not None:
                batch.append(self._resolve(other, now))
            alert = Alert(
                labels={
                    "alertname": ALERTNAME,
                    "policy": decision.policy,
                    "signal": decision.signal,
                    "pid": str(decision.pid),
                    "comm": decision.comm,
                    "cgroup": decision.cgroup,
                    "host": self._host,
                },
                annotations={
                    "summary": decision.message,
                    "reason": decision.reason,
                    "outcome": decision.outcome,
                    "action": decision.action or "",
                },
                starts_at=decision.time,
                ends_at=now + 3 * self._repeat_s,
                generator_url=self._generator_url,
            )
            self._open[key] = _Incident(alert, now)
            self._by_pid[key[:2]] = key
            self.stats.fired += 1
            batch.append(alert)
        self._enqueue(batch)

    # -- Observer -------------------------------------------------------------------------------

    def observe(self, snapshot: AgentSnapshot) -> None:
        """Resolve incidents whose offender is gone or released; re-send long-open ones."""
        present = {(o.policy, o.pid) for o in snapshot.offenders if o.state != "released"}
        now = self._clock()
        batch: list[Alert] = []
        with self._lock:
            for key, incident in list(self._open.items()):
                if key[:2] not in present:
                    batch.append(self._resolve(key, now))
                elif now - incident.last_sent >= self._repeat_s:
                    incident.alert = replace(incident.alert, ends_at=now + 3 * self._repeat_s)
                    incident.last_sent = now
                    self.stats.repeated += 1
                    batch.append(incident.alert)
        self._enqueue(batch)

    def _resolve(self, key: IncidentKey, now: float) -> Alert:
        incident = self._open.pop(key)
        if self._by_pid.get(key[:2]) == key:
            del self._by_pid[key[:2]]
        self.stats.resolved += 1
        return replace(incident.alert, ends_at=now, resolved=True)

    # -- sending --------------------------------------------------------------------------------

    def _enqueue(self, batch: list[Alert]) -> None:
        if not batch or not self._targets:
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.stats.dropped += 1
            log.warning("alert queue full: %d alert(s) dropped", len(batch))

    def _send_loop(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                for target in self._targets:
                    try:
                        target.send(batch)
                        self.stats.sent += 1
                    except (OSError, urllib.error.URLError, ValueError) as err:
                        self.stats.failed += 1
                        log.warning("alert to %r failed: %s", target, err)
                    except Exception:  # a target must never take the agent down
                        self.stats.failed += 1
                        log.exception("alert to %r failed", target)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far was sent (or failed). False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop the sending thread. Open incidents stay firing until
        their ``endsAt``: the agent stopping says nothing about the offender."""
        self.flush(timeout_s)
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
