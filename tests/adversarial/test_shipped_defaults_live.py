"""The shipped policies on the real kernel: a flooded root service is never a kill candidate.

The real agent runs the shipped policies/ and playbooks/ in dry-run (they match every process
on the host, so enforcing them here could touch processes this test did not start; dry-run
takes the same decisions and acts on nothing). Two bounded fork storms run side by side, both
as root: one in a systemd-style service cgroup (/system.slice/<name>.service, as pid 1 would
start an MTA or inetd), one in a plain cgroup. The service storm must only ever be quarantined
(then notified about); the plain storm must still escalate to a kill.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remedy.engine.guards import NEVER_ENDS
from testkit.launcher import AgentProcess
from testkit.sandbox import CGROUP_ROOT, CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

REPO = Path(__file__).resolve().parents[2]
STORM = REPO / "tests" / "workloads" / "storm.py"


def _hierarchies() -> list[Path]:
    """Where CgroupSandbox makes its directories (v2: the root; v1: pids, cpu, and cgroup2)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    roots = [CGROUP_ROOT / "pids", CGROUP_ROOT / "cpu"]
    if (CGROUP_ROOT / "unified" / "cgroup.procs").exists():
        roots.append(CGROUP_ROOT / "unified")
    return roots


@pytest.fixture
def service_cgroup() -> Iterator[CgroupSandbox]:
    """A pids-limited test cgroup named like a systemd service; /system.slice is created (and
    removed afterwards) where this host has none."""
    made: list[Path] = []
    box: CgroupSandbox | None = None
    try:
        for root in _hierarchies():
            slice_dir = root / "system.slice"
            if not slice_dir.exists():
                slice_dir.mkdir()
                made.append(slice_dir)
        box = CgroupSandbox(f"system.slice/remedy-test-{uuid.uuid4().hex[:12]}.service")
        yield box
    finally:
        if box is not None:
            box.cleanup()
        for slice_dir in made:
            with contextlib.suppress(OSError):  # another test's service cgroup lives there
                slice_dir.rmdir()


def _config(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped files, unchanged, in a root-owned private directory (file safety)."""
    out = []
    for name in ("policies", "playbooks"):
        dest = tmp_path / name
        dest.mkdir()
        for src in sorted((REPO / name).glob("*.yaml")):
            (dest / src.name).write_text(src.read_text())
        out.append(dest)
    return out[0], out[1]


def _storm(box: CgroupSandbox) -> subprocess.Popen[bytes]:
    # Flat out for 6 s (well past the shipped 200 forks/s even on a busy host), so the ladder
    # has windows to escalate in (cooldown 2 s); bounded by --count, time and the box's pids.max.
    argv = [sys.executable, str(STORM), "fork", "--count", "20000", "--seconds", "6"]
    return box.spawn([*argv, "--rate", "0"], stderr=subprocess.PIPE)


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_flooded_root_service_is_only_ever_quarantined_while_a_plain_storm_is_killed(
    tmp_path: Path, test_cgroup: CgroupSandbox, service_cgroup: CgroupSandbox
) -> None:
    policies, playbooks = _config(tmp_path)
    audit = tmp_path / "audit.jsonl"
    agent = AgentProcess(
        [
            "--dry-run",
            "--policies",
            str(policies),
            "--playbooks",
            str(playbooks),
            "--audit",
            str(audit),
            "--quarantine-root",
            f"{test_cgroup.rel}/quarantine",
            "--duration",
            "60",
        ],
        cwd=REPO,
        log_path=tmp_path / "agent.log",
    )
    agent.wait_ready()
    try:
        daemon, plain = _storm(service_cgroup), _storm(test_cgroup)
        assert daemon.wait(30) == 0
        assert plain.wait(30) == 0
    finally:
        rc = agent.stop()
    print(agent.output())
    assert rc == 0
    decisions = _audit(audit)

    served = [d for d in decisions if d["pid"] == daemon.pid]
    assert served, "the service storm crossed the threshold: it must have been decided on"
    assert {d["policy"] for d in served} == {"service-fork-storm"}
    assert {d["cgroup"] for d in served} == {str(service_cgroup.pids_dir)}
    assert {d["action"] for d in served} <= NEVER_ENDS
    assert "quarantine" in {d["action"] for d in served if d["outcome"] == "would-act"}

    bomb = [d for d in decisions if d["pid"] == plain.pid]
    assert {d["policy"] for d in bomb} == {"fork-bomb"}
    assert [d["action"] for d in bomb if d["outcome"] == "would-act"][:2] == ["quarantine", "kill"]
