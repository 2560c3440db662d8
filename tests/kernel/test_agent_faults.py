"""Faults injected into the real agent, each while a bounded fork storm runs in the test's own
cgroup: the storm's record is still decided afterwards (or the agent exits non-zero), never a
live process that does nothing (issue 11).

Fault: the undo journal holds an expired record naming an action this version does not know.
Start-up reconciles it (the revert fails and is journaled), and the first retry after
RETRY_FIRST_S raises KeyError inside the engine's tick, which used to end the worker thread for
good while the main thread waited forever and the metrics server kept serving."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from remedy.actions.undoer import RETRY_FIRST_S
from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"
UNKNOWN_ID = "f" * 32

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-fork
signal: fork_rate
threshold: 100
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


def _journal_with_an_unknown_action(path: Path) -> None:
    now = time.time()
    record = {
        "id": UNKNOWN_ID,
        "action": "frobnicate",  # no such action in this version
        "policy": "gone",
        "pid": 999_999,
        "start_ticks": 1,
        "cgroup": "/remedy-test-nowhere",
        "created": now - 100,
        "expires": now - 50,  # expired: reconciled at start, retried on the tick
    }
    path.write_text(json.dumps({"op": "apply", "record": record, "at": now - 100}) + "\n")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:  # the agent is gone: no answer at all
        return 0, str(err)


def _fault_reached(agent: AgentProcess, port: int, journal: Path) -> bool:
    """The retry ran: it raised (contained: the metric counts it; or not: the worker's
    traceback is in the output), or a fixed undoer closed the record. Either way the tick that
    used to kill the worker is behind us."""
    if "Exception in thread remedy-worker" in agent.output() or agent.proc.poll() is not None:
        return True
    metrics = _get(port, "/metrics")[1]
    if re.search(r'remedy_worker_errors_total\{exception="KeyError",site="tick"\} [1-9]', metrics):
        return True
    closed = [
        json.loads(line)
        for line in journal.read_text().splitlines()
        if '"op": "revert"' in line or '"op": "abandon"' in line
    ]
    return any(entry.get("id") == UNKNOWN_ID for entry in closed)


def test_a_journal_naming_an_unknown_action_does_not_stop_the_agent_deciding(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "policies" / "fork.yaml").write_text(POLICY.format(rel=test_cgroup.rel))
    (tmp_path / "playbooks" / "contain.yaml").write_text(PLAYBOOK)
    journal, audit = tmp_path / "undo.jsonl", tmp_path / "audit.jsonl"
    _journal_with_an_unknown_action(journal)
    agent = AgentProcess(
        [
            "--policies",
            str(tmp_path / "policies"),
            "--playbooks",
            str(tmp_path / "playbooks"),
            "--audit",
            str(audit),
            "--journal",
            str(journal),
            "--metrics",
            "127.0.0.1:0",
            "--duration",
            "90",
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
    )
    storm_pid = None
    try:
        agent.wait_ready()
        port = int(re.findall(r"serving on http://127\.0\.0\.1:(\d+)/metrics", agent.output())[0])
        # Until the fault shows, or past its time in any case (a version that reads the record
        # differently may never raise): the storm must come after the retry either way.
        past = time.monotonic() + RETRY_FIRST_S + 3
        while not _fault_reached(agent, port, journal) and time.monotonic() < past:
            time.sleep(0.2)
        time.sleep(0.5)  # a few more ticks after the fault
        assert agent.proc.poll() is None, f"agent exited:\n{agent.output()}"

        argv = [sys.executable, str(STORM), "fork", "--count", "300", "--seconds", "10"]
        storm = test_cgroup.spawn(argv)
        assert storm.wait(20) == 0
        storm_pid = storm.pid
        deadline = time.monotonic() + 15
        while not audit.exists() or f'"pid": {storm_pid},' not in audit.read_text():
            assert agent.proc.poll() is None, f"agent exited:\n{agent.output()}"
            assert time.monotonic() < deadline, f"the storm was never decided:\n{agent.output()}"
            time.sleep(0.1)
        # Still alive and ready: the fault is counted, not hidden behind a pod that is Ready.
        status, body = _get(port, "/healthz")
        assert status == 200, body
        status, body = _get(port, "/readyz")
        assert status == 200, body
    finally:
        rc = agent.stop()
    print(agent.output())
    assert rc != -9, "the agent had to be killed: it did not stop by itself"
    mine = [json.loads(x) for x in audit.read_text().splitlines() if f'"pid": {storm_pid},' in x]
    assert mine[0]["outcome"] == "would-act" and mine[0]["action"] == "quarantine"
    verify = subprocess.run(
        [sys.executable, "-m", "remedy", "audit", "--verify", str(audit)],
        check=False,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
