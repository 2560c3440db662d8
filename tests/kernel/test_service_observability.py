"""Observability end to end: a real Alertmanager receives and resolves remedy's alerts, and the
real agent serves Prometheus metrics and alerts for a fork storm in the test's cgroup."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from remedy.engine.decisions import Decision
from remedy.service.alerts import Alerter, AlertmanagerTarget
from remedy.status import AgentSnapshot
from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

REQUIRE = os.environ.get("REMEDY_REQUIRE_BPF") == "1"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

AM_CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
receivers:
  - name: "null"
"""

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-observe
signal: fork_rate
threshold: 100
window: 1s
match:
  cgroups: ["{rel}"]
playbook: test-observe-kill
dry_run: true
cooldown: 100ms
release_after: 3s
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: test-observe-kill
steps:
  - action: kill
"""


def _need(path: str, what: str) -> str:
    if shutil.which(path) is None:
        if REQUIRE:
            pytest.fail(f"REMEDY_REQUIRE_BPF=1 but {what} is missing ({path})")
        pytest.skip(f"{what} missing ({path}); make setup installs it")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


def _until(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


class Hook:
    """A local webhook receiver that keeps every POSTed JSON body."""

    def __init__(self) -> None:
        self.posts: list[Any] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager on a free loopback port, no clustering, a receiver that drops all."""
    binary = _need(ALERTMANAGER, "Alertmanager (Debian prometheus-alertmanager)")
    config = tmp_path / "alertmanager.yml"
    config.write_text(AM_CONFIG)
    (tmp_path / "am-data").mkdir()
    url = f"http://127.0.0.1:{_free_port()}"
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            return _get(url + "/-/ready") is not None

        _until(ready, "Alertmanager /-/ready")
        yield url
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def _alerts(am: str, **labels: str) -> list[dict[str, Any]]:
    """Alerts Alertmanager holds with these labels (resolved ones included while it keeps
    them)."""
    got: list[dict[str, Any]] = json.loads(_get(am + "/api/v2/alerts"))
    return [a for a in got if all(a["labels"].get(k) == v for k, v in labels.items())]


def _decision(pid: int) -> Decision:
    return Decision(
        time=time.time(), policy="am-test", signal="fork_rate", pid=pid, start_ticks=1,
        comm="bomb", ppid=1, exe=None, cgroup="/am-test", count=300, window_s=1.0,
        action="kill", step=0, dry_run=True, outcome="would-act", reason="monitor mode",
        message=f"would kill pid {pid} (bomb)", state="cooldown",
    )  # fmt: skip


def test_alertmanager_receives_and_resolves_an_alert(alertmanager: str) -> None:
    alerter = Alerter([AlertmanagerTarget(alertmanager)], host="test-host")
    pid = 4_000_000 + os.getpid() % 1000  # not a real process: only a label
    for _ in range(5):
        alerter.record(_decision(pid))
    assert alerter.flush()
    (alert,) = _until(lambda: _alerts(alertmanager, pid=str(pid)), "the alert in Alertmanager")
    assert alert["labels"]["alertname"] == "RemedyOffender"
    assert alert["labels"]["host"] == "test-host"
    assert alert["annotations"]["summary"] == f"would kill pid {pid} (bomb)"
    assert alert["status"]["state"] == "active"
    empty = AgentSnapshot("kernel", {}, 0, 0, {}, (), 0.0, 0.0)
    alerter.observe(empty)  # the offender is gone
    alerter.close()
    assert (alerter.stats.fired, alerter.stats.resolved, alerter.stats.failed) == (1, 1, 0)

    def resolved() -> bool:
        # Alertmanager drops resolved alerts from the active list; while it still lists one,
        # its endsAt is the resolve time, already past.
        left = _alerts(alertmanager, pid=str(pid))
        return not left or left[0]["endsAt"] <= _now_rfc3339()

    _until(resolved, "the alert resolved")


@pytest.mark.kernel
@pytest.mark.usefixtures("bpf_ready")
def test_agent_serves_metrics_and_one_alert_for_a_fork_storm(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path, alertmanager: str
) -> None:
    am, hook = alertmanager, Hook()
    promtool = _need("promtool", "promtool (Debian prometheus)")
    policies, playbooks = tmp_path / "policies", tmp_path / "playbooks"
    policies.mkdir()
    playbooks.mkdir()
    (policies / "fork.yaml").write_text(POLICY.format(rel=test_cgroup.rel))
    (playbooks / "kill.yaml").write_text(PLAYBOOK)
    metrics_url = f"http://127.0.0.1:{_free_port()}/metrics"
    audit = tmp_path / "audit.jsonl"
    agent = AgentProcess(
        [
            "--policies", str(policies), "--playbooks", str(playbooks),
            "--audit", str(audit), "--duration", "60",
            "--metrics", metrics_url.removeprefix("http://").removesuffix("/metrics"),
            "--alertmanager", am, "--webhook", hook.url,
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
    )  # fmt: skip
    try:
        agent.wait_ready()
        # Paced so the storm outlives the checks below: many windows over threshold, many
        # would-act decisions, one incident.
        argv = [sys.executable, str(STORM), "fork", "--count", "1600", "--rate", "200"]
        argv += ["--seconds", "8"]
        proc = test_cgroup.spawn(argv)
        storm = proc.pid

        def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            text = _get(metrics_url)
            got = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text.decode())
                for s in family.samples
            }
            would = (
                "remedy_decisions_total",
                (("outcome", "would-act"), ("policy", "test-observe"), ("reason_class", "monitor")),
            )
            # Decisions count at once; the funnel comes from the once-a-second snapshot.
            events = got.get(("remedy_kernel_events_total", (("signal", "fork_rate"),)), 0)
            return got if got.get(would, 0) >= 1 and events >= 600 else None

        got = _until(scraped, "a would-act decision and the storm's forks in the metrics")
        assert got[("remedy_records_emitted_total", (("signal", "fork_rate"),))] >= 1
        assert got[("remedy_sensor_info", (("kind", "kernel"),))] == 1
        assert got[("remedy_bpf_programs", ())] >= 1
        if os.geteuid() == 0:  # the agent turned on kernel BPF accounting
            assert got[("remedy_bpf_stats_enabled", ())] == 1
            assert got[("remedy_bpf_run_count_total", ())] >= 600
            assert got[("remedy_bpf_run_time_seconds_total", ())] > 0
        text = _get(metrics_url)
        done = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
        )
        assert done.returncode == 0, (done.stdout + done.stderr).decode()

        alerts = _until(lambda: _alerts(alertmanager, pid=str(storm)), "the storm's alert")
        assert len(alerts) == 1
        assert alerts[0]["labels"]["policy"] == "test-observe"
        assert alerts[0]["status"]["state"] == "active"
        assert proc.wait(30) == 0
        # The storm exited: the engine releases it and the incident resolves.
        _until(
            lambda: all(a["endsAt"] <= _now_rfc3339() for a in _alerts(am, pid=str(storm))),
            "the storm's alert resolved",
        )
    finally:
        rc = agent.stop()
        hook.close()
    print(agent.output())
    assert rc == 0
    decisions = [json.loads(line) for line in audit.read_text().splitlines()]
    would = [d for d in decisions if d["pid"] == storm and d["outcome"] == "would-act"]
    assert len(would) >= 2, "the storm should draw repeated would-act decisions"
    # Many decisions, one incident: exactly one firing and one resolved post for the storm.
    posts = [a for batch in hook.posts for a in batch if a["labels"]["pid"] == str(storm)]
    assert [a["status"] for a in posts] == ["firing", "resolved"], posts
    assert "metrics: enabled kernel.bpf_stats_enabled" in agent.output() or os.geteuid() != 0
