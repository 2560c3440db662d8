"""Alerts: one per incident, resolved when the offender leaves the snapshot, sent off-thread."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from remedy.engine.decisions import Decision
from remedy.service.alerts import Alert, Alerter, AlertmanagerTarget, LogTarget, WebhookTarget
from remedy.status import AgentSnapshot, OffenderView


class Capture:
    """A local HTTP server that records every POST body (path, JSON)."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[tuple[str, Any]] = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                capture.posts.append((self.path, json.loads(body)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    c = Capture()
    yield c
    c.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def decision(outcome: str = "would-act", pid: int = 100, start: int = 5) -> Decision:
    return Decision(
        time=999_999.0, policy="fork", signal="fork_rate", pid=pid, start_ticks=start,
        comm="bomb", ppid=1, exe=None, cgroup="/test", count=300, window_s=1.0, action="kill",
        step=0, dry_run=True, outcome=outcome, reason="monitor mode",
        message=f"would kill pid {pid} (bomb)", state="cooldown",
    )  # fmt: skip


def snapshot(*pids: int, state: str = "cooldown") -> AgentSnapshot:
    return AgentSnapshot(
        sensor="kernel", counters={}, records_received=0, queue_full=0, engine={},
        offenders=tuple(OffenderView(p, "bomb", "fork", state, 1) for p in pids),
        cpu_s=0.0, max_rss_mib=0.0,
    )  # fmt: skip


class ListTarget:
    def __init__(self) -> None:
        self.batches: list[list[Alert]] = []

    def send(self, alerts: Any) -> None:
        self.batches.append(list(alerts))


def test_one_alert_per_incident_resolved_when_the_offender_leaves() -> None:
    target, clock = ListTarget(), Clock()
    alerter = Alerter([target], host="h1", clock=clock)
    alerter.record(decision("skipped"))  # not an action: no incident
    assert alerter.open_incidents == []
    for _ in range(50):  # a storm of decisions for one process: one alert
        alerter.record(decision())
    alerter.record(decision("acted"))
    alerter.observe(snapshot(100))
    assert alerter.open_incidents == [("fork", 100, 5)]
    clock.now += 2
    alerter.observe(snapshot())  # released or exited
    alerter.close()
    assert [len(b) for b in target.batches] == [1, 1]
    fired, resolved = target.batches[0][0], target.batches[1][0]
    assert fired.labels == {
        "alertname": "RemedyOffender", "policy": "fork", "signal": "fork_rate", "pid": "100",
        "comm": "bomb", "cgroup": "/test", "host": "h1",
    }  # fmt: skip
    assert fired.annotations["summary"] == "would kill pid 100 (bomb)"
    assert not fired.resolved and fired.ends_at > clock.now
    assert resolved.labels == fired.labels and resolved.resolved and resolved.ends_at == clock.now
    assert resolved.starts_at == fired.starts_at == 999_999.0
    assert (alerter.stats.fired, alerter.stats.resolved, alerter.stats.sent) == (1, 1, 2)


def test_released_state_resolves_and_a_new_process_is_a_new_incident() -> None:
    target, clock = ListTarget(), Clock()
    alerter = Alerter([target], clock=clock)
    alerter.record(decision("breaker-tripped"))
    alerter.observe(snapshot(100, state="released"))
    alerter.record(decision(pid=100, start=5))  # a new incident for the same process
    alerter.record(decision(pid=100, start=77))  # the pid was reused: the old one resolves
    alerter.close()
    flat = [(a.labels["pid"], a.resolved) for b in target.batches for a in b]
    assert flat == [("100", False), ("100", True), ("100", False), ("100", True), ("100", False)]
    assert alerter.open_incidents == [("fork", 100, 77)]


def test_open_incidents_are_re_sent_unchanged_after_the_repeat_interval() -> None:
    target, clock = ListTarget(), Clock()
    alerter = Alerter([target], clock=clock, repeat_s=300)
    alerter.record(decision())
    for _ in range(10):
        clock.now += 29
        alerter.observe(snapshot(100))
    assert alerter.stats.repeated == 0
    clock.now += 11
    alerter.observe(snapshot(100))
    alerter.close()
    assert alerter.stats.repeated == 1
    first, again = target.batches[0][0], target.batches[1][0]
    assert again.labels == first.labels and again.starts_at == first.starts_at
    assert again.ends_at > first.ends_at and not again.resolved


def test_webhook_posts_the_alert_json(capture: Capture) -> None:
    clock = Clock()
    alerter = Alerter([WebhookTarget(capture.url + "/hook")], host="h1", clock=clock)
    alerter.record(decision())
    alerter.observe(snapshot())
    alerter.close()
    assert [p for p, _ in capture.posts] == ["/hook", "/hook"]
    (fired,), (resolved,) = (body for _, body in capture.posts)
    assert fired["labels"]["alertname"] == "RemedyOffender" and fired["labels"]["pid"] == "100"
    assert fired["status"] == "firing" and resolved["status"] == "resolved"
    assert fired["startsAt"].endswith("Z") and resolved["endsAt"] == "1970-01-12T13:46:40.000Z"
    assert fired["annotations"]["reason"] == "monitor mode"


def test_alertmanager_target_posts_to_api_v2(capture: Capture) -> None:
    alerter = Alerter([AlertmanagerTarget(capture.url + "/")])
    alerter.record(decision())
    alerter.close()
    ((path, body),) = capture.posts
    assert path == "/api/v2/alerts"
    assert set(body[0]) == {"labels", "annotations", "startsAt", "endsAt"}


def test_network_errors_are_counted_never_raised() -> None:
    dead = Capture()
    url = dead.url
    dead.close()  # nothing listens there any more
    failing = Capture(status=500)
    try:
        alerter = Alerter([WebhookTarget(url, timeout_s=1), WebhookTarget(failing.url)])
        alerter.record(decision())
        alerter.close()
    finally:
        failing.close()
    assert (alerter.stats.sent, alerter.stats.failed) == (0, 2)


def test_a_slow_receiver_never_blocks_the_engine() -> None:
    gate = threading.Event()

    class Slow:
        def send(self, alerts: Any) -> None:
            gate.wait(10)

    alerter = Alerter([Slow()], queue_size=2)
    for pid in range(10):  # each a new incident; the sender is stuck on the first
        alerter.record(decision(pid=pid))
    assert alerter.stats.fired == 10
    assert alerter.stats.dropped >= 6
    gate.set()
    alerter.close()


def test_log_target_writes_one_line_per_alert() -> None:
    out = io.StringIO()
    alerter = Alerter([LogTarget(out)], host="h1")
    alerter.record(decision())
    alerter.observe(snapshot())
    alerter.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("alert FIRING RemedyOffender ") and "pid=100" in lines[0]
    assert lines[1].startswith("alert RESOLVED RemedyOffender ")


def test_a_kill_refused_because_the_audit_is_down_fires_an_alert() -> None:
    """issue 11: while the audit cannot be written, irreversible steps stop, loudly."""
    target, clock = ListTarget(), Clock()
    alerter = Alerter([target], host="h1", clock=clock)
    alerter.record(decision("audit-unavailable"))
    alerter.close()
    [fired] = target.batches[0]
    assert fired.annotations["outcome"] == "audit-unavailable"
    assert alerter.stats.fired == 1
