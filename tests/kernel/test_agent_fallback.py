"""Where eBPF cannot be used, the agent samples /proc through the same interface, and says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = pytest.mark.root

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-cpu
signal: cpu
threshold: 50
window: 500ms
for: 2
match:
  cgroups: ["{rel}"]
playbook: test-contain
dry_run: true
cooldown: 10s
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


def _run_spin(
    tmp_path: Path, box: CgroupSandbox, repo: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[str, list[dict[str, object]], dict[str, object], int]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "policies" / "cpu.yaml").write_text(POLICY.format(rel=box.rel))
    (tmp_path / "playbooks" / "contain.yaml").write_text(PLAYBOOK)
    agent = AgentProcess(
        [
            "--policies",
            str(tmp_path / "policies"),
            "--playbooks",
            str(tmp_path / "playbooks"),
            "--audit",
            str(tmp_path / "audit.jsonl"),
            "--stats",
            str(tmp_path / "stats.json"),
            "--duration",
            "60",
            *extra,
        ],
        cwd=repo,
        log_path=tmp_path / "agent.log",
        env=env,
    )
    try:
        agent.wait_ready()
        spin = box.spawn([sys.executable, str(STORM), "cpu", "--count", "0", "--seconds", "2.5"])
        assert spin.wait(20) == 0
    finally:
        agent.stop()
    audit = tmp_path / "audit.jsonl"
    lines = [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
    stats = json.loads((tmp_path / "stats.json").read_text())
    return agent.output(), [d for d in lines if d["pid"] == spin.pid], stats, spin.pid


def test_sampler_catches_a_cpu_runaway_through_the_same_engine(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    out, mine, stats, _ = _run_spin(tmp_path, test_cgroup, repo_root, "--sensor", "sampler")
    print(out)
    assert "ready: /proc sampler (degraded fidelity)" in out
    assert stats["sensor"] == "sampler"
    assert mine and mine[0]["outcome"] == "would-act" and mine[0]["action"] == "quarantine"


def test_auto_falls_back_loudly_when_the_kernel_program_cannot_load(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    empty = tmp_path / "no-bpf"
    empty.mkdir()
    out, mine, stats, _ = _run_spin(
        tmp_path, test_cgroup, repo_root, env={"REMEDY_BPF_DIR": str(empty)}
    )
    print(out)
    assert "WARNING: kernel sensors unavailable" in out
    assert "falling back to sampling /proc" in out
    assert stats["sensor"] == "sampler"
    assert mine, "the sampler still catches the runaway"
