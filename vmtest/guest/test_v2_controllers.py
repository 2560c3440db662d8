"""remedy's cgroup v2 driver and actions on a real pure-v2 kernel, in a subtree systemd delegated.

The directory-tree tests (tests/actuators/test_cgroups_v2.py) check the files remedy writes;
these check what the kernel does with them: controllers enabled down a delegated subtree, the
"no internal processes" rule, real limits holding a real fork storm and a real memory grower,
a quarantine and its revert.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import Limits
from remedy.actions.params import QuarantineParams
from remedy.actions.quarantine import Quarantine
from remedy.engine.offender import Subject
from remedy.errors import CgroupError
from remedy.proc import ProcFS
from vmtest.guest.conftest import ROOT, Delegated

pytestmark = pytest.mark.root

MiB = 1 << 20
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# Grows by 4 MiB every 20 ms up to ``limit`` MiB, touching every page, then sleeps.
GROWER = """
import sys, time
chunks = []
for i in range(int(sys.argv[1]) // 4):
    chunks.append(bytearray(4 << 20))
    time.sleep(0.02)
print("grown", flush=True)
time.sleep(60)
"""
# Forks up to 64 sleepers, counting how many forks the kernel refused; bounded in count.
FORKER = """
import os, time
made = refused = 0
for _ in range(64):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
    except BlockingIOError:
        refused += 1
print(made, refused, flush=True)
time.sleep(30)
"""


def _read(box: Delegated, rel: str, name: str) -> str:
    return (box.path(rel) / name).read_text().strip()


def _events(box: Delegated, rel: str, name: str = "memory.events") -> dict[str, int]:
    pairs = (line.split() for line in _read(box, rel, name).split("\n") if line)
    return {k: int(v) for k, v in pairs}


def test_the_host_is_pure_v2_with_the_controllers_systemd_delegates(delegated: Delegated) -> None:
    assert (ROOT / "cgroup.controllers").exists() and not (ROOT / "unified").exists()
    assert {"cpu", "memory", "pids"} <= set(
        _read(delegated, delegated.rel, "cgroup.controllers").split()
    )


def test_create_enables_controllers_down_a_delegated_subtree_and_the_kernel_takes_the_limits(
    delegated: Delegated,
) -> None:
    rel = f"{delegated.rel}/q/inner"
    limits = Limits(pids_max=8, cpu_cores=0.25, memory_high=64 * MiB, memory_max=128 * MiB)
    delegated.driver.create(rel, limits)
    assert {"cpu", "memory", "pids"} <= set(
        _read(delegated, delegated.rel, "cgroup.subtree_control").split()
    )
    assert _read(delegated, rel, "pids.max") == "8"
    assert _read(delegated, rel, "cpu.max") == "25000 100000"
    assert _read(delegated, rel, "memory.high") == str(64 * MiB)
    assert _read(delegated, rel, "memory.max") == str(128 * MiB)
    assert delegated.driver.read_knobs(rel, ["pids_max", "cpu_cores"]) == {
        "pids_max": "8",
        "cpu_cores": "25000 100000",
    }
    delegated.driver.remove(f"{delegated.rel}/q")
    assert not delegated.path(f"{delegated.rel}/q").exists()


def test_no_internal_processes_is_a_cgroup_error_naming_the_cgroup(delegated: Delegated) -> None:
    """A cgroup with processes of its own cannot enable controllers for children (EBUSY): the
    driver says so, the process stays where it was, nothing is left half made."""
    busy = f"{delegated.rel}/busy"
    delegated.driver.create(busy, Limits())
    child = delegated.spawn(SLEEPER, where=busy)
    delegated.wait_member(child.pid, busy)
    with pytest.raises(CgroupError, match="cannot enable controllers") as exc:
        delegated.driver.create(f"{busy}/q", Limits(pids_max=4))
    assert exc.value.cgroup == f"{busy}/q"
    assert delegated.driver.members(busy) == [child.pid]
    assert child.poll() is None


def test_pids_max_refuses_the_forks_of_a_real_storm(delegated: Delegated) -> None:
    rel = f"{delegated.rel}/capped"
    delegated.driver.create(rel, Limits(pids_max=8))
    storm = delegated.spawn([sys.executable, "-c", FORKER], where=rel, stdout=subprocess.PIPE)
    assert storm.stdout is not None
    made, refused = (int(x) for x in storm.stdout.readline().split())
    # The launcher's shell execs python, so the storm itself is one of the 8 tasks.
    assert made == 7 and refused == 64 - 7
    assert int(_read(delegated, rel, "pids.current")) == 8
    assert _events(delegated, rel, "pids.events")["max"] >= refused


def test_a_memory_grower_is_held_by_memory_high_and_stopped_by_memory_max(
    delegated: Delegated,
) -> None:
    """memory.high throttles (reclaims) without killing; memory.max is the hard wall: the
    grower is OOM-killed inside its cgroup and nothing outside it is touched."""
    high = f"{delegated.rel}/high"
    delegated.driver.create(high, Limits(memory_high=48 * MiB))
    held = delegated.spawn([sys.executable, "-c", GROWER, "96"], where=high, stdout=subprocess.PIPE)
    hard = f"{delegated.rel}/max"
    delegated.driver.create(hard, Limits(memory_max=64 * MiB))
    killed = delegated.spawn([sys.executable, "-c", GROWER, "256"], where=hard)
    bystander = delegated.spawn(SLEEPER)

    assert killed.wait(120) == -9
    assert _events(delegated, hard, "memory.events")["oom_kill"] >= 1
    # No swap in the VM: the high cgroup cannot push anon pages out, so it is throttled (high
    # events) and stays near its limit; it is never killed.
    deadline = time.monotonic() + 60
    while _events(delegated, high)["high"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _events(delegated, high)["high"] > 0
    assert _events(delegated, high).get("oom_kill", 0) == 0
    assert held.poll() is None and bystander.poll() is None


def test_quarantine_and_its_revert_with_real_controllers(
    delegated: Delegated, pin: Callable[..., Subject]
) -> None:
    """Out of a memory-limited cgroup into a quarantine that carries the memory limit along
    (v2 moves pages with the process), capped in tasks and CPU; the revert moves it home and
    removes the quarantine."""
    home = f"{delegated.rel}/app"
    delegated.driver.create(home, Limits(memory_max=512 * MiB))
    child = delegated.spawn(SLEEPER, where=home)
    delegated.wait_member(child.pid, home)
    ctx = ActionContext(delegated.driver, ProcFS(), f"{delegated.rel}/quarantine")
    subject = pin(child.pid, delegated.driver)
    action, params = Quarantine(), QuarantineParams(pids_max=8, cpu=0.5)
    record = action.undo(params, subject, ctx, policy="t", ttl_s=30, now_wall=time.time())
    action.run(params, subject, ctx)
    rel = record.cgroup
    assert delegated.driver.members(rel) == [child.pid]
    assert _read(delegated, rel, "pids.max") == "8"
    assert _read(delegated, rel, "cpu.max") == "50000 100000"
    assert int(_read(delegated, rel, "memory.max")) <= 512 * MiB

    detail = action.revert(record, ctx)
    assert "moved 1 task(s) back" in detail, detail
    assert delegated.driver.members(home) == [child.pid]
    assert not delegated.driver.exists(rel)
    assert child.poll() is None
