"""Forcing pid reuse on purpose: the next fork gets ``ns_last_pid + 1`` when that pid is free.

Every process started here is the test's own child, inside the test's pids-limited cgroup.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from remedy.actions.params import (
    ActionParams,
    ContinueParams,
    FreezeParams,
    IoniceParams,
    KillParams,
    LimitPidsParams,
    QuarantineParams,
    ReniceParams,
    StopParams,
    TerminateParams,
    ThrottleCpuParams,
)
from testkit.sandbox import CgroupSandbox

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]

# One step of every action that can reach a process, with parameters that would show.
PARAMS: dict[str, ActionParams] = {
    "quarantine": QuarantineParams(pids_max=16, cpu=0.2),
    "throttle_cpu": ThrottleCpuParams(cpu=0.1),
    "limit_pids": LimitPidsParams(max=4),
    "freeze": FreezeParams(),
    "renice": ReniceParams(nice=19),
    "ionice": IoniceParams.model_validate({"class": "idle"}),
    "stop": StopParams(),
    "continue": ContinueParams(),
    "kill": KillParams(signal="SIGKILL"),
    "terminate": TerminateParams(grace_s=0.1),
}


def spawn_at(
    box: CgroupSandbox, pid: int, argv: Sequence[str], attempts: int = 200
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in ``box`` as exactly ``pid`` (which must be free: reaped). Another fork
    on the host can take the pid between our write and our fork; then try again."""
    for _ in range(attempts):
        NS_LAST_PID.write_text(str(pid - 1))
        proc = box.spawn(argv)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait(5)
    raise AssertionError(f"could not get pid {pid} after {attempts} attempts")


def storm(box: CgroupSandbox, mode: str, count: int, *args: str) -> subprocess.Popen[bytes]:
    """tests/workloads/storm.py: ``count`` events, at most 20 s."""
    argv = [sys.executable, str(STORM), mode, "--count", str(count), "--seconds", "20", *args]
    return box.spawn(argv)


def wait_gone(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """Wait for ``proc`` to exit (successfully) and be reaped, so its pid is free again."""
    assert proc.wait(timeout_s) in (0, -9), f"workload {proc.args!r} failed"
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{proc.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
