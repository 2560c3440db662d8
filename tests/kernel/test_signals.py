"""Every signal of the catalogue on the real kernel: a bounded workload that trips it, one that
does not, and the single record's context (key, parent, cgroup, comm).

One program with every section is loaded once for the module; each test writes its own
configuration into the config map (which is also how policies change at run time)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import Harness, cgroup_key, start

from remedy.sensors.catalog import CATALOGUE, SignalSettings
from remedy.sensors.context import CgroupIndex
from remedy.sensors.kernel import KernelSensor
from remedy.sensors.records import SensorRecord
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

PYTHON = Path(sys.executable).name[:15]  # the workload's comm, as the kernel truncates it


@pytest.fixture(scope="module")
def all_signals(bpf_ready: None) -> Iterator[Harness]:
    off = SignalSettings(window_s=1.0, threshold=1 << 40)  # armed, never crossing
    yield from start(KernelSensor(), {s.name: off for s in CATALOGUE})


@pytest.fixture
def h(all_signals: Harness) -> Harness:
    return all_signals


def _only(h: Harness, **settings: SignalSettings) -> None:
    """Configure the named signals; every other one stays armed far above any workload."""
    off = SignalSettings(window_s=1.0, threshold=1 << 40)
    h.configure(**{s.name: settings.get(s.name, off) for s in CATALOGUE})


def _check_context(record: SensorRecord, box: CgroupSandbox, parent: int, comm: str) -> None:
    assert record.ppid == parent
    assert record.comm == comm
    assert record.cgroup_id == box.cgroup_id
    index = CgroupIndex.detect()
    assert index is not None
    assert index.path_of(record.cgroup_id) == box.rel
    assert not record.degraded


# -- fork -----------------------------------------------------------------------------------


def test_fork_rate_trips_on_a_storm_not_on_a_steady_forker(
    h: Harness, test_cgroup: CgroupSandbox
) -> None:
    _only(h, fork_rate=SignalSettings(window_s=5.0, threshold=100))
    quiet = h.run(test_cgroup, "fork", "--count", "20", "--seconds", "5", "--rate", "40")
    storm = h.run(test_cgroup, "fork", "--count", "300", "--seconds", "10")
    assert h.of("fork_rate", quiet) == []
    [rec] = h.of("fork_rate", storm)
    assert (rec.tgid, rec.count) == (storm, 100)
    _check_context(rec, test_cgroup, parent=os.getpid(), comm=PYTHON)


def test_fork_rate_per_cgroup_sees_a_bomb_spread_over_many_pids(
    h: Harness, test_cgroup: CgroupSandbox
) -> None:
    per_pid = SignalSettings(window_s=5.0, threshold=200)
    _only(h, fork_rate=per_pid, fork_rate_cgroup=SignalSettings(window_s=5.0, threshold=200))
    h.run(test_cgroup, "fanout", "--count", "50", "--seconds", "10")  # 100 forks: below
    assert h.of("fork_rate_cgroup", cgroup_key(h.sensor, test_cgroup)) == []
    h.configure(fork_rate=per_pid, fork_rate_cgroup=SignalSettings(window_s=5.0, threshold=200))
    storm = h.run(test_cgroup, "fanout", "--count", "150", "--seconds", "10")  # 300 forks
    assert [r.signal for r in h.records if r.signal.startswith("fork") and r.tgid >= storm] == [
        "fork_rate_cgroup"
    ], "no single process crossed 200; the cgroup did"
    [rec] = h.of("fork_rate_cgroup", cgroup_key(h.sensor, test_cgroup))
    assert rec.count == 200


# -- exec -----------------------------------------------------------------------------------


def test_exec_rate_counts_execs_against_the_parent(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, exec_rate=SignalSettings(window_s=5.0, threshold=100))
    quiet = h.run(test_cgroup, "exec", "--count", "30", "--seconds", "10")
    storm = h.run(test_cgroup, "exec", "--count", "150", "--seconds", "10")
    assert h.of("exec_rate", quiet) == []
    [rec] = h.of("exec_rate", storm)
    assert rec.count == 100
    _check_context(rec, test_cgroup, parent=storm, comm="true")  # the child that exec'd


def test_exec_rate_per_cgroup(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, exec_rate_cgroup=SignalSettings(window_s=5.0, threshold=100))
    h.run(test_cgroup, "exec", "--count", "30", "--seconds", "10")
    assert h.of("exec_rate_cgroup", cgroup_key(h.sensor, test_cgroup)) == []
    h.configure(exec_rate_cgroup=SignalSettings(window_s=5.0, threshold=100))
    h.run(test_cgroup, "exec", "--count", "150", "--seconds", "10")
    [rec] = h.of("exec_rate_cgroup", cgroup_key(h.sensor, test_cgroup))
    assert rec.count == 100


# -- churn ----------------------------------------------------------------------------------


def test_churn_counts_only_children_that_die_young(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, churn=SignalSettings(window_s=10.0, threshold=20, lifetime_s=0.1))
    elders = h.run(test_cgroup, "churn", "--count", "30", "--seconds", "10", "--child-ms", "150")
    young = h.run(test_cgroup, "churn", "--count", "30", "--seconds", "10")
    assert h.of("churn", elders) == []
    [rec] = h.of("churn", young)
    assert rec.count == 20
    assert rec.ppid == young  # the record's task is the child that exited


# -- cpu ------------------------------------------------------------------------------------


def test_cpu_runaway_must_be_sustained(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, cpu=SignalSettings(window_s=0.3, threshold=60, sustain=3))
    blip = h.run(test_cgroup, "cpu", "--count", "0", "--seconds", "0.25", "--hold", "1")
    spin = h.run(test_cgroup, "cpu", "--count", "0", "--seconds", "1.8")
    assert h.of("cpu", blip) == []
    mine = h.of("cpu", spin)
    assert 1 <= len(mine) <= 4  # one per window once three windows in a row crossed
    assert all(r.count >= 60 for r in mine)
    assert mine[0].elapsed_s < 0.3
    _check_context(mine[0], test_cgroup, parent=os.getpid(), comm=PYTHON)


# -- memory ---------------------------------------------------------------------------------


def test_rss_crosses_past_a_size(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, rss=SignalSettings(window_s=10.0, threshold=100))
    small = h.run(test_cgroup, "rss", "--count", "30", "--seconds", "0.3")
    big = h.run(test_cgroup, "rss", "--count", "150", "--seconds", "0.3")
    assert h.of("rss", small) == []
    [rec] = h.of("rss", big)
    assert 100 <= rec.count < 150
    _check_context(rec, test_cgroup, parent=os.getpid(), comm=PYTHON)


# -- files ----------------------------------------------------------------------------------


def test_open_rate(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, open_rate=SignalSettings(window_s=10.0, threshold=500))
    few = h.run(test_cgroup, "open", "--count", "100", "--seconds", "10")
    many = h.run(test_cgroup, "open", "--count", "1000", "--seconds", "10")
    assert h.of("open_rate", few) == []
    [rec] = h.of("open_rate", many)
    assert rec.count == 500
    _check_context(rec, test_cgroup, parent=os.getpid(), comm=PYTHON)


def test_fd_growth_is_opens_minus_closes(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, fd_growth=SignalSettings(window_s=10.0, threshold=300))
    tidy = h.run(test_cgroup, "open", "--count", "1000", "--seconds", "10")
    leak = h.run(test_cgroup, "fdleak", "--count", "500", "--seconds", "10")
    assert h.of("fd_growth", tidy) == []
    [rec] = h.of("fd_growth", leak)
    assert rec.count == 300


# -- net ------------------------------------------------------------------------------------


def test_connect_rate(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, connect_rate=SignalSettings(window_s=10.0, threshold=100))
    few = h.run(test_cgroup, "connect", "--count", "20", "--seconds", "10")
    many = h.run(test_cgroup, "connect", "--count", "200", "--seconds", "10")
    assert h.of("connect_rate", few) == []
    [rec] = h.of("connect_rate", many)
    assert rec.count == 100
    _check_context(rec, test_cgroup, parent=os.getpid(), comm=PYTHON)


def test_stacks_are_captured_and_symbolized(h: Harness, test_cgroup: CgroupSandbox) -> None:
    _only(h, fork_rate=SignalSettings(window_s=5.0, threshold=50))
    storm = h.run(test_cgroup, "fork", "--count", "100", "--seconds", "10")
    [rec] = h.of("fork_rate", storm)
    frames = h.sensor.stack(rec.kstack_id)
    assert any("clone" in f for f in frames), frames
    assert rec.ustack_id >= 0
