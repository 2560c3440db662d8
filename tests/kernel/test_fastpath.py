"""The in-kernel fast path (issue 5): an armed offender, or one crossing the fork_rate threshold
in threshold mode, is signalled inside the kernel at its next fork. Workloads run only in the
test's pids-limited cgroup; threshold mode is filtered to that cgroup and disabled in a finally.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from kernel_helpers import STORM, Harness, start

from remedy.compiler.plan import FastPathRule, SensorPlan, SignalPlan, Tier, WindowClass
from remedy.errors import ActionError
from remedy.sensors.catalog import SignalSettings
from remedy.sensors.fastpath import ArmC, FastPath
from remedy.sensors.kernel import KernelSensor
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

# High enough that no record matters while a test arms by hand.
QUIET = SignalSettings(window_s=10.0, threshold=1_000_000)


@pytest.fixture
def fast(bpf_ready: None) -> Iterator[tuple[Harness, FastPath]]:
    for harness in start(KernelSensor(), {"fork_rate": QUIET}):
        fp = FastPath(harness.sensor)
        try:
            yield harness, fp
        finally:
            fp.disable()


def _forker(box: CgroupSandbox, count: int, seconds: float, rate: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(STORM), "fork", "--count", str(count), "--seconds", str(seconds)]
    return box.spawn([*argv, "--rate", str(rate)], stderr=subprocess.PIPE)


def _forking(h: Harness, proc: subprocess.Popen[bytes], at_least: int = 5) -> int:
    """Wait until ``proc`` (the storm, after its shell exec'd it) has forked; its window value."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        value = h.sensor.window_value("fork_rate", proc.pid) or 0
        if value >= at_least:
            return value
        time.sleep(0.02)
    raise AssertionError("the forker never started forking")


def _birth(h: Harness, proc: subprocess.Popen[bytes]) -> int:
    birth = h.sensor.birth(proc.pid)
    assert birth, "the kernel recorded no birth for a process forked while it watched"
    return birth


def test_struct_mirrors_match_the_kernel_layout(fast: tuple[Harness, FastPath]) -> None:
    _, fp = fast
    for mirror, kernel in ((ArmC, fp.layout_types()),):
        assert ctypes.sizeof(mirror) == ctypes.sizeof(kernel)
        for (name, *_), (kname, *_) in zip(mirror._fields_, kernel._fields_, strict=True):
            assert name == kname
            assert getattr(mirror, name).offset == getattr(kernel, kname).offset


def test_an_armed_forker_is_killed_at_its_next_fork(
    fast: tuple[Harness, FastPath], test_cgroup: CgroupSandbox
) -> None:
    h, fp = fast
    proc = _forker(test_cgroup, 2000, 20, rate=200)
    before = _forking(h, proc)
    fp.arm(proc.pid, _birth(h, proc), signal.SIGKILL, dry_run=False)
    assert proc.wait(10) == -signal.SIGKILL
    through = (h.sensor.window_value("fork_rate", proc.pid) or 0) - before
    counters = fp.counters()
    hits = counters["armed_hits"]  # the arm itself went with the process
    print(f"\narmed: {hits} hit(s), {through} fork(s) counted after arming, {counters}")
    assert 1 <= hits <= 3
    assert through <= 3
    assert counters["signals_sent"] >= 1


def test_a_dry_run_arm_counts_and_signals_nothing(
    fast: tuple[Harness, FastPath], test_cgroup: CgroupSandbox
) -> None:
    h, fp = fast
    proc = _forker(test_cgroup, 100, 20, rate=200)
    _forking(h, proc)
    fp.arm(proc.pid, _birth(h, proc), signal.SIGKILL, dry_run=True)
    assert proc.wait(20) == 0
    counters = fp.counters()
    hits = counters["armed_hits"]
    assert hits >= 10
    assert counters["dry_run"] >= hits
    assert counters["signals_sent"] == 0


def test_a_protected_tgid_is_never_signalled(
    fast: tuple[Harness, FastPath], test_cgroup: CgroupSandbox
) -> None:
    h, fp = fast
    proc = _forker(test_cgroup, 100, 20, rate=200)
    _forking(h, proc)
    fp.protect([proc.pid])
    fp.arm(proc.pid, _birth(h, proc), signal.SIGKILL, dry_run=False)
    assert proc.wait(20) == 0
    counters = fp.counters()
    hits = counters["armed_hits"]
    assert hits >= 10
    assert counters["protected"] >= hits
    assert counters["signals_sent"] == 0


def test_an_arm_on_a_reused_pid_never_fires(
    fast: tuple[Harness, FastPath], test_cgroup: CgroupSandbox
) -> None:
    h, fp = fast
    proc = _forker(test_cgroup, 100, 20, rate=200)
    _forking(h, proc)
    # An arm for another birth: as if the offender died and its pid was reused.
    fp.arm(proc.pid, _birth(h, proc) - 1, signal.SIGKILL, dry_run=False)
    assert proc.wait(20) == 0
    assert fp.counters()["armed_hits"] == 0
    assert fp.counters()["stale"] >= 10


def test_an_arm_is_deleted_when_its_process_dies(
    fast: tuple[Harness, FastPath], test_cgroup: CgroupSandbox
) -> None:
    h, fp = fast
    proc = _forker(test_cgroup, 100, 20, rate=100)
    _forking(h, proc)
    fp.arm(proc.pid, _birth(h, proc), signal.SIGTERM, dry_run=True)
    assert proc.pid in fp.armed()
    assert proc.wait(20) == 0
    assert proc.pid not in fp.armed()
    assert h.sensor.birth(proc.pid) is None
    assert fp.counters()["disarmed_at_exit"] >= 1


def test_a_full_arm_map_is_a_refusal_not_a_crash(fast: tuple[Harness, FastPath]) -> None:
    _, fp = fast
    table = fp.sensor.table("fastpath_armed")
    try:
        # Not live processes: these tgids are above pid_max, so no arm can ever fire.
        for i in range(1024):
            table[ctypes.c_uint32(10_000_000 + i)] = ArmC(signal=9, dry_run=1, birth_ns=1, hits=0)
        with pytest.raises(ActionError, match="cannot arm"):
            fp.arm(10_000_000 + 5000, 1, signal.SIGKILL, dry_run=True)
        with pytest.raises(ActionError, match="birth is unknown"):
            fp.arm(10_000_000 + 5000, 0, signal.SIGKILL, dry_run=True)
    finally:
        table.clear()


def _kill_tier(threshold: int, cgroup_glob: str) -> SensorPlan:
    """Policy mode: one fork_rate tier with ``kernel: kill``, scoped to ``cgroup_glob``."""
    tier = Tier(1, "fork-kill", threshold, cgroups=(cgroup_glob,), fastpath=FastPathRule(9, False))
    cls = WindowClass(0, 10.0, (tier,))
    return SensorPlan({"fork_rate": SignalPlan("fork_rate", (cls,))})


def test_threshold_mode_kills_a_storm_at_the_crossing_and_spares_a_slow_forker(
    fast: tuple[Harness, FastPath], test_cgroup: CgroupSandbox
) -> None:
    h, fp = fast
    threshold = 50
    h.configure_plan(_kill_tier(threshold, f"/{test_cgroup.name}"))
    try:
        slow = _forker(test_cgroup, 20, 20, rate=20)
        storm = _forker(test_cgroup, 2000, 20, rate=0)
        assert storm.wait(20) == -signal.SIGKILL
        through = h.sensor.window_value("fork_rate", storm.pid)
        assert slow.wait(20) == 0, "a forker below the threshold must survive"
        counters = fp.counters()
    finally:
        h.configure(fork_rate=QUIET)
    print(f"\nthreshold mode: {through} forks got through (threshold {threshold}), {counters}")
    assert through is not None and threshold <= through < threshold + 20
    assert counters["threshold_hits"] >= 1
    assert counters["signals_sent"] >= 1


def test_threshold_mode_ignores_other_cgroups(
    fast: tuple[Harness, FastPath], test_cgroup: CgroupSandbox
) -> None:
    h, fp = fast
    # A glob no cgroup matches: the storm in the test cgroup is out of the tier's scope.
    h.configure_plan(_kill_tier(50, f"/{test_cgroup.name}-not-this-one"))
    try:
        storm = _forker(test_cgroup, 300, 20, rate=0)
        assert storm.wait(20) == 0
    finally:
        h.configure(fork_rate=QUIET)
    assert fp.counters()["threshold_hits"] == 0
