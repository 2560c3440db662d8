"""End to end: the real agent, the real kernel filter, a real bounded fork storm.

The test policy matches only the test's own cgroup, so the agent can never act on anything
but processes this test spawned, whatever else the host is doing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-fork-bomb
signal: fork_rate
threshold: 100
window: 1s
match:
  cgroups: ["{rel}", "{rel}/*"]
playbook: test-contain
dry_run: false
cooldown: 500ms
release_after: 5s
rate_limit: {{max_actions: 20, per: 1m}}
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: test-contain
steps:
  - action: quarantine
    params: {pids_max: 8, cpu: 0.2}
  - action: kill
    params: {signal: SIGKILL}
"""


def _config(tmp_path: Path, box: CgroupSandbox) -> tuple[Path, Path]:
    policies, playbooks = tmp_path / "policies", tmp_path / "playbooks"
    policies.mkdir()
    playbooks.mkdir()
    (policies / "fork.yaml").write_text(POLICY.format(rel=box.rel))
    (playbooks / "contain.yaml").write_text(PLAYBOOK)
    return policies, playbooks


def _agent(tmp_path: Path, box: CgroupSandbox, repo: Path, *extra: str) -> AgentProcess:
    policies, playbooks = _config(tmp_path, box)
    agent = AgentProcess(
        [
            "--policies",
            str(policies),
            "--playbooks",
            str(playbooks),
            "--audit",
            str(tmp_path / "audit.jsonl"),
            "--stats",
            str(tmp_path / "stats.json"),
            "--quarantine-root",
            f"{box.rel}/quarantine",
            "--duration",
            "60",
            *extra,
        ],
        cwd=repo,
        log_path=tmp_path / "agent.log",
    )
    agent.wait_ready()
    return agent


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _forker(
    box: CgroupSandbox, forks: int, seconds: float, rate: float = 0.0
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(STORM), "fork", "--count", str(forks), "--seconds", str(seconds)]
    return box.spawn([*argv, "--rate", str(rate)], stderr=subprocess.PIPE)


def test_enforce_quarantines_then_kills_the_storm_and_spares_the_innocent(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    agent = _agent(tmp_path, test_cgroup, repo_root)
    try:
        innocent = _forker(test_cgroup, forks=60, seconds=10, rate=20)
        started = time.time()
        storm = _forker(test_cgroup, forks=100_000, seconds=20)
        storm_rc = storm.wait(30)
        stopped = time.time()
        assert innocent.wait(30) == 0, "the slow forker must be untouched"
    finally:
        rc = agent.stop()
    print(agent.output())
    assert rc == 0
    assert storm_rc == -9, "the storm should have been killed by SIGKILL"
    mine = [d for d in _audit(tmp_path) if d["pid"] == storm.pid]
    acted = [d for d in mine if d["outcome"] == "acted"]
    assert [d["action"] for d in acted][:2] == ["quarantine", "kill"]
    assert all(d["dry_run"] is False and d["policy"] == "test-fork-bomb" for d in mine)
    assert not [d for d in _audit(tmp_path) if d["pid"] == innocent.pid]
    contained = acted[0]["time"] - started
    killed = acted[1]["time"] - started
    print(
        f"\ncontainment: quarantined {contained * 1000:.0f} ms after the storm started, "
        f"killed after {killed * 1000:.0f} ms (storm ended at {(stopped - started) * 1000:.0f} ms)"
    )
    assert contained < stopped - started
    stats = AgentProcess.read_stats(tmp_path / "stats.json")
    assert stats["events_seen"] > 10 * stats["records_emitted"]
    # The quarantine is removed once its members are dead and the offender is released.
    assert not list((test_cgroup.pids_dir / "quarantine").glob("q-*"))


def test_dry_run_writes_would_records_and_leaves_the_storm_alone(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    agent = _agent(tmp_path, test_cgroup, repo_root, "--dry-run")
    try:
        storm = _forker(test_cgroup, forks=3000, seconds=20)
        storm_rc = storm.wait(30)
        _, err = storm.communicate()
    finally:
        rc = agent.stop()
    print(agent.output())
    assert rc == 0
    assert storm_rc == 0 and b"fork 3000" in err, "dry-run must not touch the storm"
    mine = [d for d in _audit(tmp_path) if d["pid"] == storm.pid]
    assert mine, "dry-run must still audit what it would do"
    assert all(d["dry_run"] is True for d in mine)
    assert mine[0]["outcome"] == "would-act" and mine[0]["action"] == "quarantine"
    assert mine[0]["message"].startswith("would quarantine")
    # Context attached once, near the event: parent chain, cgroup path, exe, stack.
    context = mine[0]["context"]
    assert context["parents"][0]["pid"] == os.getpid()
    assert context["cgroup_path"] == test_cgroup.rel
    assert context["exe"] == os.path.realpath(sys.executable)
    assert f"parent {os.getpid()}" in mine[0]["message"]
    assert any("clone" in frame for frame in mine[0]["stack"])
    assert not (test_cgroup.pids_dir / "quarantine").exists()
