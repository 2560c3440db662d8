"""The real agent's audit under faults, while a bounded fork storm runs in the test's cgroup:
the file renamed under it (followed, the kill written ahead) and a full filesystem (the kill
refused, the quarantine still made). `remedy audit --verify` passes after both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_agent_containment import _agent, _forker

from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]


def _lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the audit file ends in a fragment"
    return [json.loads(raw) for raw in data.splitlines()]


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "remedy", "audit", str(path), "--verify"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_an_audit_renamed_under_the_agent_is_followed_and_the_kill_written_ahead(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    agent = _agent(tmp_path, test_cgroup, repo_root)
    try:
        audit.rename(tmp_path / "audit.jsonl.1")  # logrotate, while the agent runs
        storm = _forker(test_cgroup, forks=100_000, seconds=20)
        storm_rc = storm.wait(30)
    finally:
        rc = agent.stop()
    print(agent.output())
    assert rc == 0
    assert storm_rc == -9
    lines = _lines(audit)
    assert (lines[0]["event"], lines[0]["how"]) == ("reopened", "moved or removed")
    mine = [e for e in lines if e.get("pid") == storm.pid]
    [intent] = [e for e in mine if e["outcome"] == "intent"]
    [killed] = [e for e in mine if e["outcome"] == "acted" and e["action"] == "kill"]
    assert intent["seq"] < killed["seq"] and killed["intent"] == intent["seq"]
    verified = _verify(audit)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_on_a_full_disk_the_agent_refuses_the_kill_and_still_quarantines(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    mnt = tmp_path / "audit"
    mnt.mkdir()
    source = f"remedy-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", source, str(mnt)],
        check=True,
        timeout=30,
    )
    try:
        _run_on_a_full_disk(tmp_path, mnt, test_cgroup, repo_root)
    finally:
        done = subprocess.run(["umount", str(mnt)], check=False, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True, timeout=30)
            pytest.fail(f"the test tmpfs at {mnt} was busy at teardown")


def _run_on_a_full_disk(
    tmp_path: Path, mnt: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    audit = mnt / "audit.jsonl"
    agent = _agent(tmp_path, test_cgroup, repo_root, "--audit", str(audit))
    try:
        with (mnt / "filler").open("wb") as f:
            free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
            f.write(b"x" * free)
        storm = _forker(test_cgroup, forks=3000, seconds=8)
        storm_rc = storm.wait(30)
        before = audit.read_bytes()
        (mnt / "filler").unlink()
    finally:
        rc = agent.stop()
    out = agent.output()
    print(out)
    assert rc == 0
    assert storm_rc != -9, "the kill must not run while its intent cannot be written"
    assert f"audit-unavailable (the intent could not be written to the audit {audit}" in out
    assert f"quarantine pid {storm.pid}" in out  # reversible: went on, with the disk full
    assert before == b""  # nothing half-written
    verified = _verify(audit)
    assert verified.returncode == 0, verified.stdout + verified.stderr
