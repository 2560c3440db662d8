"""execs and churn of an orphan are charged to its reaper (real_parent after the
parent died), a process that spawned none of them."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
from kernel_helpers import Harness, start

from remedy.sensors.catalog import SignalSettings
from remedy.sensors.kernel import KernelSensor
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

_EXEC_CHAIN = (
    '[ -e "$1" ] || { sleep 0.05; exec /bin/sh "$0" "$@"; }; '
    '[ "$2" -gt 0 ] && exec /bin/sh "$0" "$1" $(($2-1)); exit 0'
)
_ORPHANER = (
    "import os, sys\n"
    "if os.fork() == 0:\n    os.execv('/bin/sh', ['/bin/sh', *sys.argv[1:]])\n"
    "os._exit(0)"
)
# An innocent supervisor: a child subreaper (like systemd --user, tini, a container's init)
# that starts one job and then only reaps.
_SUBREAPER = (
    "import ctypes, os, subprocess, sys, time\n"
    "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"
    "subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]])\n"
    "while True:\n"
    "    try:\n        os.wait()\n"
    "    except ChildProcessError:\n        time.sleep(0.05)\n"
)


@pytest.fixture
def sched() -> Iterator[Harness]:
    settings = {"exec_rate": SignalSettings(window_s=10.0, threshold=100)}
    yield from start(KernelSensor(), settings)


def test_execs_of_an_orphan_are_not_charged_to_its_reaper(
    sched: Harness, test_cgroup: CgroupSandbox, tmp_path: Path
) -> None:
    script = tmp_path / "chain.sh"
    script.write_text(_EXEC_CHAIN)
    go = tmp_path / "go"
    reaper = test_cgroup.spawn(
        [sys.executable, "-c", _SUBREAPER, _ORPHANER, str(script), str(go), "300"]
    )
    try:
        time.sleep(1.0)  # the orphaner has exited; its child is the reaper's now
        go.touch()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(test_cgroup.members()) > 1:
            sched.sensor.poll(50)
        sched.drain()
        charged = [r for r in sched.records if r.signal == "exec_rate" and r.key == reaper.pid]
        assert charged == [], f"the reaper (pid {reaper.pid}) was charged: {charged[:1]}"
    finally:
        reaper.kill()
        reaper.wait(5)
