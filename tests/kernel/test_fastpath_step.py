"""A playbook step marked ``kernel: true`` arms the in-kernel fast path: the storm is killed by
the kernel at its next fork, not by a signal from user space."""

from __future__ import annotations

import json
import sys
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
threshold: 100
window: 1s
match:
  cgroups: ["{rel}"]
playbook: test-kernel-kill
mode: enforce
cooldown: 0s
release_after: 10s
---
apiVersion: remedy/v1
kind: Playbook
name: test-kernel-kill
steps:
  - action: kill
    params: {{signal: SIGKILL}}
    kernel: true
"""


def test_a_kernel_step_kills_the_storm_at_its_next_fork(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "fork.yaml").write_text(POLICY.format(rel=test_cgroup.rel))
    agent = AgentProcess(
        [
            "--policies",
            str(tmp_path / "p"),
            "--playbooks",
            str(tmp_path / "p"),
            "--audit",
            str(tmp_path / "audit.jsonl"),
            "--duration",
            "60",
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
    )
    try:
        agent.wait_ready()
        argv = [sys.executable, str(STORM), "fork", "--count", "100000", "--seconds", "20"]
        storm = test_cgroup.spawn(argv)
        rc = storm.wait(30)
    finally:
        agent.stop()
    print(agent.output())
    assert rc == -9
    intent, decision = [
        json.loads(line)
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if json.loads(line)["pid"] == storm.pid
    ]
    assert intent["outcome"] == "intent"  # an arm can end a process: written ahead
    assert decision["outcome"] == "acted"
    assert decision["intent"] == intent["seq"]
    assert "armed: the kernel sends SIGKILL at its next fork" in decision["message"]
