"""SIGHUP reloads policies in place: a valid set takes effect without reloading the kernel
program (counters and offender state survive); an invalid one is refused and the old set runs on."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-fork
signal: fork_rate
threshold: {threshold}
window: 5s
match:
  cgroups: ["{rel}"]
playbook: test-contain
dry_run: true
cooldown: 100ms
release_after: 30s
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: test-contain
steps:
  - action: quarantine
    params: {pids_max: 8, cpu: 0.2}
"""


def _wait_for(agent: AgentProcess, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in agent.output():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{agent.output()}"
        time.sleep(0.05)


def test_sighup_reloads_a_valid_set_and_refuses_an_invalid_one(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    policies, playbooks = tmp_path / "policies", tmp_path / "playbooks"
    policies.mkdir()
    playbooks.mkdir()
    policy = policies / "fork.yaml"
    policy.write_text(POLICY.format(threshold=100, rel=test_cgroup.rel))
    (playbooks / "contain.yaml").write_text(PLAYBOOK)
    audit = tmp_path / "audit.jsonl"
    agent = AgentProcess(
        [
            "--policies",
            str(policies),
            "--playbooks",
            str(playbooks),
            "--audit",
            str(audit),
            "--stats",
            str(tmp_path / "stats.json"),
            "--duration",
            "60",
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
    )

    def storm(forks: int) -> int:
        argv = [sys.executable, str(STORM), "fork", "--count", str(forks), "--seconds", "10"]
        proc = test_cgroup.spawn(argv)
        assert proc.wait(20) == 0
        time.sleep(0.5)
        return proc.pid

    try:
        agent.wait_ready()
        first = storm(300)
        policy.write_text(POLICY.format(threshold=1000, rel=test_cgroup.rel))
        agent.proc.send_signal(signal.SIGHUP)
        _wait_for(agent, "reloaded: 1 policy(ies)")
        second = storm(300)  # below the new threshold: the kernel filter was reconfigured
        policy.write_text(POLICY.format(threshold=100, rel=test_cgroup.rel) + "bogus: 1\n")
        agent.proc.send_signal(signal.SIGHUP)
        _wait_for(agent, "reload refused")
        third = storm(300)  # still the reloaded set (1000): nothing
        fourth = storm(1500)  # above it: caught
    finally:
        rc = agent.stop()
    print(agent.output())
    assert rc == 0
    pids = [json.loads(line)["pid"] for line in audit.read_text().splitlines()]
    assert first in pids and fourth in pids
    assert second not in pids and third not in pids
    assert "bogus" in agent.output()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["reloads"], stats["reloads_failed"]) == (1, 1)
    # One program for the whole run: its counters saw every storm's forks.
    assert stats["signals"]["fork_rate"]["events_seen"] >= 300 * 3 + 1500
