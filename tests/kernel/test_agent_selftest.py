"""Enforcement asked for on a host (here: a quarantine root) that cannot enforce stops the agent
at start, loudly, instead of quietly auditing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]


def test_enforce_on_a_host_that_cannot_enforce_fails_at_start(
    tmp_path: Path, repo_root: Path
) -> None:
    # A quarantine root under a file: no cgroup can ever be created there.
    argv = [
        sys.executable,
        "-m",
        "remedy",
        "run",
        "--policies",
        str(repo_root / "policies"),
        "--playbooks",
        str(repo_root / "playbooks"),
        "--journal",
        str(tmp_path / "undo.jsonl"),
        "--quarantine-root",
        "/cgroup.procs/remedy",
        "--duration",
        "5",
        # Its own socket: an agent elsewhere on the host must not decide this test.
        "--control-socket",
        str(tmp_path / "control.sock"),
    ]
    done = subprocess.run(
        argv, check=False, cwd=repo_root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot enforce on this host" in done.stderr
    assert "ready:" not in done.stdout
    # The same host in dry-run audits without probing anything.
    dry = subprocess.run(
        [*argv, "--dry-run"], check=False, cwd=repo_root, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "ready:" in dry.stdout
