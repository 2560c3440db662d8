"""terminate in the real agent: its grace runs as a timer, so the worker goes on deciding other
records and feeding the systemd watchdog while a SIGTERM-ignoring hog waits for its SIGKILL.

Both hogs are the test's own, inside its pids-limited cgroup, and spin for at most 20 s; the
policy matches only that cgroup. The watchdog is a datagram socket of the test's own
(NOTIFY_SOCKET, WATCHDOG_USEC), nothing of systemd's."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"
GRACE_S = 6.0
# Spins for at most 20 s and ignores SIGTERM (installed long before a 500 ms window can cross).
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "end = time.monotonic() + 20\nwhile time.monotonic() < end: pass"
)

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-end
signal: cpu
threshold: 30
window: 500ms
match:
  cgroups: ["{rel}"]
playbook: test-end
mode: enforce
cooldown: 30s
release_after: 60s
rate_limit: {{max_actions: 20, per: 1m}}
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: test-end
steps:
  - action: terminate
    params: {{grace_s: {grace}}}
"""


class Watchdog:
    """Collects the agent's sd_notify datagrams with the time each arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.pings: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if b"WATCHDOG=1" in data:
                self.pings.append(time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def longest_gap(self, start: float, end: float) -> float:
        times = [start, *(t for t in self.pings if start < t < end), end]
        return max(b - a for a, b in itertools.pairwise(times))


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_line(
    tmp_path: Path, pid: int, outcome: str, reason: str, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in _audit(tmp_path):
            if line["pid"] == pid and line["outcome"] == outcome and reason in line["reason"]:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {outcome} line ({reason}) for pid {pid}: {_audit(tmp_path)}")


def test_the_worker_decides_and_feeds_the_watchdog_while_a_terminate_waits_out_its_grace(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "policies" / "end.yaml").write_text(POLICY.format(rel=test_cgroup.rel))
    (tmp_path / "playbooks" / "end.yaml").write_text(PLAYBOOK.format(grace=GRACE_S))
    watchdog = Watchdog(tmp_path / "notify.sock")
    agent = AgentProcess(
        [
            *("--policies", str(tmp_path / "policies")),
            *("--playbooks", str(tmp_path / "playbooks")),
            *("--audit", str(tmp_path / "audit.jsonl")),
            *("--quarantine-root", f"{test_cgroup.rel}/quarantine"),
            *("--duration", "60"),
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
        # Fed every 0.5 s from the worker thread.
        env={"NOTIFY_SOCKET": str(watchdog.path), "WATCHDOG_USEC": "1000000"},
    )
    try:
        agent.wait_ready()
        began = time.time()
        stubborn = test_cgroup.spawn([sys.executable, "-c", STUBBORN])
        termed = _wait_line(tmp_path, stubborn.pid, "acted", "threshold crossed", 15)
        # Inside the first one's grace, a second hog is decided (and ends on its SIGTERM).
        polite = test_cgroup.spawn(
            [sys.executable, str(STORM), "cpu", "--count", "0", "--seconds", "20"]
        )
        other = _wait_line(tmp_path, polite.pid, "acted", "threshold crossed", GRACE_S)
        assert polite.wait(10) == -signal.SIGTERM
        assert stubborn.wait(GRACE_S + 5) == -signal.SIGKILL
        ended = time.time()
        # The worker fed the watchdog all along (every 0.5 s; a worker asleep in the grace: none).
        assert watchdog.longest_gap(began, ended) < 1.5
        killed = _wait_line(tmp_path, stubborn.pid, "acted", f"grace of {GRACE_S:g} s over", 5)
    finally:
        agent.stop()
        watchdog.close()
        print(agent.output())
    assert other["time"] < killed["time"], "the second hog waited for the first one's grace"
    assert killed["time"] - termed["time"] >= GRACE_S - 0.05
    assert "SIGKILL to 1 process(es)" in killed["message"]
