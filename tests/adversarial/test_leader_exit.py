"""On kernels without sched_process_exit's group_dead (before 6.13) the leader's exit
deletes the births entry (and any arm) while the process lives on in its other threads."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
from kernel_helpers import Harness, start

from remedy.actions.process import Birth, ProcessHandle
from remedy.errors import IdentityUnverified
from remedy.proc import ProcFS
from remedy.sensors.catalog import SignalSettings
from remedy.sensors.kernel import KernelSensor
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]


class OldKernelSensor(KernelSensor):
    def defines(self, sections: tuple[str, ...]) -> dict[str, int]:
        return {**super().defines(sections), "REMEDY_EXIT_HAS_GROUP_DEAD": 0}


# The main thread leaves with SYS_exit (pthread_exit); a worker thread lives on.
_LEADER_EXITS = (
    "import ctypes, threading, time\n"
    "threading.Thread(target=time.sleep, args=(60,)).start()\n"
    "time.sleep(0.3)\n"
    "ctypes.CDLL(None).syscall(60, 0)\n"
)


@pytest.fixture
def old() -> Iterator[Harness]:
    yield from start(OldKernelSensor(), {"fork_rate": SignalSettings(window_s=1.0, threshold=200)})


def test_a_live_process_keeps_its_birth_when_its_leader_thread_exits(
    old: Harness, test_cgroup: CgroupSandbox
) -> None:
    proc = test_cgroup.spawn([sys.executable, "-c", _LEADER_EXITS])
    try:
        birth = old.sensor.birth(proc.pid)
        assert birth is not None
        time.sleep(1.0)
        assert Path(f"/proc/{proc.pid}/task").exists()
        assert len(list(Path(f"/proc/{proc.pid}/task").iterdir())) >= 1
        try:
            ProcessHandle.bind(proc.pid, ProcFS(), birth=Birth(birth), registry=old.sensor).close()
        except IdentityUnverified as err:
            pytest.fail(f"a live process became unverifiable: {err}")
    finally:
        proc.kill()
        proc.wait(5)
    # ... and the entry still goes when the whole process dies.
    deadline = time.monotonic() + 5
    while old.sensor.birth(proc.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old.sensor.birth(proc.pid) is None
