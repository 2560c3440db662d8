"""The /proc sampler on the real host: the test's own bounded workloads, real psutil, no BPF.

Every workload is a child of this test, bounded in count and time, and killed and reaped in a
``finally``; nothing else on the host is signalled. Each test also runs a quiet child (``sleep``)
that must produce no record at all.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remedy.sensors.records import SensorRecord
from remedy.sensors.sampler import ProcSampler
from testkit.plans import Filter, plan_of
from testkit.sandbox import CgroupSandbox

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
    pytest.mark.timeout(30),
]

SETTINGS = {
    "fork_rate": Filter(window_s=1.0, threshold=40),
    "fork_rate_cgroup": Filter(window_s=1.0, threshold=40),
    "exec_rate": Filter(window_s=1.0, threshold=20),
    "churn": Filter(window_s=1.0, threshold=20, lifetime_s=0.2),
    "cpu": Filter(window_s=0.5, threshold=50),
    "rss": Filter(window_s=1.0, threshold=100),
    "open_rate": Filter(window_s=1.0, threshold=200),
    "fd_growth": Filter(window_s=1.0, threshold=200),
    "connect_rate": Filter(window_s=1.0, threshold=30),
}

# 300 children over ~1.5 s; each execs sleep 0.15 so a 0.1 s sampler sees nearly all of them,
# even on a loaded CI machine.
FORKER = """
import os, time
for _ in range(300):
    if os.fork() == 0:
        try:
            os.execv("/bin/sleep", ["sleep", "0.15"])
        finally:
            os._exit(1)
    time.sleep(0.005)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
time.sleep(1)
"""
SPINNER = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
HOG = "import time\nb = b'x' * (150 << 20)  # every page written\ntime.sleep(2)\n"
# The pause lets the sampler see the child with its few fds first: its baseline.
LEAKER = (
    "import os, time\ntime.sleep(0.4)\n"
    "fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(300)]\ntime.sleep(1.5)\n"
)
CONNECTOR = (
    "import socket, sys, time\ntime.sleep(0.4)\n"
    "conns = [socket.create_connection(('127.0.0.1', int(sys.argv[1]))) for _ in range(60)]\n"
    "time.sleep(1.5)\n"
)

Spawn = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn(test_cgroup: CgroupSandbox) -> Iterator[Spawn]:
    """Start python children inside the test's pids-limited cgroup; kill and reap every one of
    them afterwards, whatever happens (the sandbox also sweeps what they forked)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(code: str, *args: str) -> subprocess.Popen[bytes]:
        proc = test_cgroup.spawn([sys.executable, "-c", code, *args])
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


@pytest.fixture
def sampler() -> Iterator[tuple[ProcSampler, list[SensorRecord]]]:
    s = ProcSampler(interval_s=0.1)
    records: list[SensorRecord] = []
    s.open_ring_buffer(records.append)
    s.start(plan_of(SETTINGS))
    try:
        yield s, records
    finally:
        s.close()


def _watch(
    sampler: ProcSampler, records: list[SensorRecord], pid: int, signals: set[str], seconds: float
) -> dict[str, SensorRecord]:
    """Poll until each signal has a record for ``pid`` (and at least a second has passed, so the
    quiet child is watched over several samples), or ``seconds`` pass."""
    begun = time.monotonic()
    while time.monotonic() < begun + seconds:
        sampler.poll(100)
        got = {r.signal: r for r in records if r.tgid == pid and r.signal in signals}
        if set(got) == signals and time.monotonic() > begun + 1.0:
            return got
    return {r.signal: r for r in records if r.tgid == pid and r.signal in signals}


def _check(
    sampler: tuple[ProcSampler, list[SensorRecord]],
    spawn: Spawn,
    code: str,
    signals: set[str],
    *args: str,
    seconds: float = 3.0,
) -> dict[str, SensorRecord]:
    s, records = sampler
    quiet = subprocess.Popen(["sleep", "3"])
    try:
        worker = spawn(code, *args)
        got = _watch(s, records, worker.pid, signals, seconds)
    finally:
        quiet.kill()
        quiet.wait(5)
    assert set(got) == signals, f"no {signals - set(got)} record for pid {worker.pid}"
    assert all(r.sampled and r.ts_boot_ns > 0 for r in got.values())
    assert not [r for r in records if r.tgid == quiet.pid], "the quiet child was reported"
    return got


def test_forks_execs_and_churn_of_a_forking_child(
    sampler: tuple[ProcSampler, list[SensorRecord]], spawn: Spawn
) -> None:
    got = _check(sampler, spawn, FORKER, {"fork_rate", "fork_rate_cgroup", "exec_rate", "churn"})
    assert got["fork_rate"].count == 40 and got["fork_rate"].key == got["fork_rate"].tgid
    assert sampler[0].cgroup_path(got["fork_rate_cgroup"].key) is not None


def test_cpu_of_a_busy_loop(sampler: tuple[ProcSampler, list[SensorRecord]], spawn: Spawn) -> None:
    got = _check(sampler, spawn, SPINNER, {"cpu"})
    assert 50 <= got["cpu"].count <= 150  # sampling jitter: a delta can land in a short window


def test_rss_of_a_child_touching_150_mib(
    sampler: tuple[ProcSampler, list[SensorRecord]], spawn: Spawn
) -> None:
    got = _check(sampler, spawn, HOG, {"rss"})
    assert 100 <= got["rss"].count <= 200  # crosses while the child is still filling


def test_fds_of_a_leaking_child(
    sampler: tuple[ProcSampler, list[SensorRecord]], spawn: Spawn
) -> None:
    got = _check(sampler, spawn, LEAKER, {"open_rate", "fd_growth"})
    assert got["fd_growth"].count >= 200 and got["open_rate"].count >= 200


def test_connects_of_a_child(sampler: tuple[ProcSampler, list[SensorRecord]], spawn: Spawn) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=128) as server:
        port = server.getsockname()[1]
        got = _check(sampler, spawn, CONNECTOR, {"connect_rate"}, str(port))
    assert got["connect_rate"].count >= 30
    # The accepted ends belong to this test, which listens on the port: not connects.
    assert not [
        r for r in sampler[1] if r.signal == "connect_rate" and r.tgid != got["connect_rate"].tgid
    ]
