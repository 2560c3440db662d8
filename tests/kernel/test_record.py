"""End to end: `remedy record` on a real bounded storm, then `remedy replay` of what it wrote.

The policy matches only the test's own cgroup, and the recorder takes no action, so the storm
runs to completion untouched; the replay says what enforcement would have done to it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remedy.tools import replay
from remedy.tools.trace import read_trace
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

CONFIG = """\
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
---
apiVersion: remedy/v1
kind: Playbook
name: test-contain
steps:
  - action: quarantine
    params: {{pids_max: 8, cpu: 0.2}}
  - action: kill
    params: {{signal: SIGKILL}}
"""


def test_record_then_replay_decides_on_the_storm(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    policies, playbooks = tmp_path / "policies", tmp_path / "playbooks"
    policies.mkdir()
    playbooks.mkdir()
    (policies / "fork.yaml").write_text(CONFIG.format(rel=test_cgroup.rel))
    trace, log = tmp_path / "trace.jsonl", tmp_path / "record.log"
    argv = [sys.executable, "-m", "remedy", "record", "--sensor", "kernel", "--duration", "60"]
    argv += ["--policies", str(policies), "--playbooks", str(playbooks), "--out", str(trace)]
    with log.open("w") as log_file:
        recorder = subprocess.Popen(
            argv,
            cwd=repo_root,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while "ready:" not in log.read_text():
                assert recorder.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            storm = test_cgroup.spawn(
                [sys.executable, str(STORM), "fork", "--count", "3000", "--seconds", "5"]
            )
            assert storm.wait(30) == 0, "the recorder must not touch the storm"
            time.sleep(0.5)
        finally:
            recorder.send_signal(signal.SIGINT)
            rc = recorder.wait(30)
    print(log.read_text())
    assert rc == 0
    assert "recorded " in log.read_text()

    header, entries = read_trace(trace)
    assert header.signals["fork_rate"].threshold == 100
    mine = [e for e in entries if e.record.tgid == storm.pid]
    assert mine, "the storm's crossing must be in the trace"
    subject = mine[0].subject
    assert subject is not None and subject.cgroup == test_cgroup.rel
    assert subject.context is not None and subject.context.parents[0].pid == os.getpid()

    printed = io.StringIO()
    assert replay.main(trace, [policies], [playbooks], fmt="json", out=printed) == 0
    decisions = json.loads(printed.getvalue())["base"]["decisions"]
    storm_decisions = [d for d in decisions if d["pid"] == storm.pid]
    assert storm_decisions[0]["outcome"] == "acted"
    assert storm_decisions[0]["action"] == "quarantine"
    assert storm_decisions[0]["policy"] == "test-fork-bomb"
    assert all(d["cgroup"].endswith(test_cgroup.rel) for d in decisions)
