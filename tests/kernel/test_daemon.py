"""The daemon as an operator runs it: one agent with metrics, alerts, the control socket, the
audit log and the undo journal; reloaded with a good and a bad policy set; stopped with SIGTERM,
which reverts its throttles. Workloads only in the test's cgroup; policies match only it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_observability import _alerts, _free_port, _get, _need, _until, alertmanager

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]
__all__ = ["alertmanager"]  # the fixture, imported for this module's tests

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

CONFIG = """\
apiVersion: remedy/v1
kind: Policy
name: test-fork
signal: fork_rate
threshold: {threshold}
window: 1s
match:
  cgroups: ["{rel}"]
playbook: test-contain
mode: enforce
cooldown: 60s
release_after: 120s
---
apiVersion: remedy/v1
kind: Playbook
name: test-contain
steps:
  - action: quarantine
    params: {{pids_max: 64, cpu: 0.5}}
"""


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return path
    return ""


def test_the_daemon_end_to_end(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path, alertmanager: str
) -> None:
    promtool = _need("promtool", "promtool (Debian prometheus)")
    policies = tmp_path / "p"
    policies.mkdir()
    policy = policies / "all.yaml"
    policy.write_text(CONFIG.format(threshold=100, rel=test_cgroup.rel))
    port = _free_port()
    agent = AgentProcess(
        [
            "--policies",
            str(policies),
            "--playbooks",
            str(policies),
            "--audit",
            str(tmp_path / "audit.jsonl"),
            "--journal",
            str(tmp_path / "undo.jsonl"),
            "--quarantine-root",
            f"{test_cgroup.rel}/quarantine",
            "--metrics",
            f"127.0.0.1:{port}",
            "--alertmanager",
            alertmanager,
            "--duration",
            "120",
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
    )
    sock = (tmp_path / "agent.log").with_suffix(".sock")
    try:
        agent.wait_ready()
        storm = test_cgroup.spawn(
            [
                sys.executable,
                str(STORM),
                "fork",
                "--count",
                "600",
                "--seconds",
                "20",
                "--hold",
                "60",
            ]
        )
        quarantine = f"{test_cgroup.rel}/quarantine/"
        _until(lambda: _cgroup_of(storm.pid).startswith(quarantine), "the storm quarantined")

        # Reload: a good set, then a bad one (refused; the good one keeps running).
        policy.write_text(CONFIG.format(threshold=150, rel=test_cgroup.rel))
        agent.proc.send_signal(signal.SIGHUP)
        _until(lambda: "reloaded: 1 policy(ies)" in agent.output(), "the good reload")
        policy.write_text(CONFIG.format(threshold=150, rel=test_cgroup.rel) + "bogus: 1\n")
        agent.proc.send_signal(signal.SIGHUP)
        _until(lambda: "reload refused" in agent.output(), "the bad reload refused")

        # Metrics, as Prometheus would scrape them.
        def scraped() -> str:
            text = _get(f"http://127.0.0.1:{port}/metrics").decode()
            return text if 'remedy_reloads_total{result="refused"} 1.0' in text else ""

        text = _until(scraped, "metrics after both reloads")
        assert "remedy_active_throttles 1.0" in text
        assert 'remedy_reloads_total{result="ok"} 1.0' in text
        assert 'remedy_offenders{state="cooldown"} 1.0' in text
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text, text=True, capture_output=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr

        # Alertmanager has one alert for the storm.
        alerts = _until(lambda: _alerts(alertmanager, pid=str(storm.pid)), "the alert")
        assert len(alerts) == 1

        # remedy status over the control socket.
        status = subprocess.run(
            [sys.executable, "-m", "remedy", "status", "--socket", str(sock), "--json"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        shown = json.loads(status.stdout)
        assert [o["pid"] for o in shown["offenders"]] == [storm.pid]
        assert [t["action"] for t in shown["throttles"]] == ["quarantine"]
    finally:
        agent.proc.send_signal(signal.SIGTERM)  # how systemd stops it
        rc = agent.proc.wait(30)
        agent.stop()
    # (the storm itself is killed with the test's cgroup)
    print(agent.output())
    assert rc == 0
    # Stopping reverted the throttle: the storm is back in its own cgroup.
    assert _cgroup_of(storm.pid) == test_cgroup.rel
    journal = [json.loads(x) for x in (tmp_path / "undo.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in journal if e["op"] == "revert"] == ["agent shutdown"]
    verify = subprocess.run(
        [sys.executable, "-m", "remedy", "audit", str(tmp_path / "audit.jsonl"), "--verify"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
