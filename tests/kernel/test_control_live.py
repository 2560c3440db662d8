"""The control socket of a running agent: status, silences, manual release, top."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from remedy.status import request
from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

CONFIG = """\
apiVersion: remedy/v1
kind: Policy
name: test-fork
signal: fork_rate
threshold: 100
window: 1s
match:
  cgroups: ["{rel}"]
playbook: test-contain
mode: enforce
cooldown: 30s
release_after: 60s
---
apiVersion: remedy/v1
kind: Playbook
name: test-contain
steps:
  - action: quarantine
    params: {{pids_max: 64, cpu: 0.5}}
"""


def _wait(predicate: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_status_silence_release_and_top_against_a_running_agent(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "all.yaml").write_text(CONFIG.format(rel=test_cgroup.rel))
    agent = AgentProcess(
        [
            "--policies",
            str(tmp_path / "p"),
            "--playbooks",
            str(tmp_path / "p"),
            "--quarantine-root",
            f"{test_cgroup.rel}/quarantine",
            "--duration",
            "60",
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
    )
    sock = (tmp_path / "agent.log").with_suffix(".sock")
    storm_argv = [
        sys.executable,
        str(STORM),
        "fork",
        "--count",
        "600",
        "--seconds",
        "20",
        "--hold",
        "30",
    ]
    try:
        agent.wait_ready()
        storm = test_cgroup.spawn(storm_argv)
        status = _wait(
            lambda: next((s for s in [request(sock, {"op": "status"})] if s["offenders"]), None)
        )
        [offender] = status["offenders"]
        assert (offender["pid"], offender["state"]) == (storm.pid, "cooldown")
        assert status["counters"]["fork_rate"]["events_seen"] >= 100
        assert [t["action"] for t in status["throttles"]] == ["quarantine"]

        # The CLI: status as JSON, and one frame of top.
        cli = [sys.executable, "-m", "remedy"]
        shown = subprocess.run(
            [*cli, "status", "--socket", str(sock), "--json"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert json.loads(shown.stdout)["offenders"][0]["pid"] == storm.pid
        top = subprocess.run(
            [*cli, "top", "--socket", str(sock), "--once"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "fork_rate" in top.stdout

        # Manual undo: the quarantine is taken back and the offender forgotten.
        released = request(sock, {"op": "release", "pid": storm.pid})
        assert released["reverted"] and "moved 1 task(s) back" in released["reverted"][0]
        assert test_cgroup.rel in Path(f"/proc/{storm.pid}/cgroup").read_text()
        _wait(lambda: not request(sock, {"op": "status"})["offenders"])

        # A silence added at run time applies at once.
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 600))
        added = request(
            sock,
            {
                "op": "silence-add",
                "silence": {
                    "name": "maint",
                    "author": "tester",
                    "reason": "load test",
                    "expires": expires,
                    "match": {"cgroups": [test_cgroup.rel]},
                },
            },
        )
        assert added["ok"], added
        second = test_cgroup.spawn(storm_argv)
        decision = _wait(
            lambda: next(
                (d for d in request(sock, {"op": "status"})["decisions"] if d["pid"] == second.pid),
                None,
            )
        )
        assert decision["outcome"] == "skipped" and "silenced by tester" in decision["message"]
        assert request(sock, {"op": "silence-expire", "name": "maint"})["expired"] is True
    finally:
        agent.stop()
    print(agent.output())
