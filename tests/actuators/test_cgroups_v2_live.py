"""cgroup v2 core operations on this machine's real cgroup2 mount, not a directory tree.

The hybrid host's cgroup2 (/sys/fs/cgroup/unified) has no controllers, but its core files are
the kernel's: cgroup.procs, cgroup.freeze, cgroup.kill and cgroup.events. Every process here is
the test's own child, in the test's pids-limited sandbox (whose cgroup2 directory these
sub-cgroups live in).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV2Driver, Limits
from remedy.actions.kill import Kill
from remedy.actions.params import KillParams
from remedy.engine.offender import Subject
from remedy.errors import ProtectedProcess
from remedy.proc import ProcessInfo, ProcFS
from testkit.sandbox import CgroupSandbox

pytestmark = pytest.mark.root

# The cgroup2 mount: the root on a pure v2 host, /unified on a hybrid one (like this machine).
UNIFIED = next(
    (
        m
        for m in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
        if (m / "cgroup.controllers").exists()
    ),
    Path("/sys/fs/cgroup/unified"),
)
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def v2(test_cgroup: CgroupSandbox) -> Iterator[tuple[CgroupV2Driver, str, CgroupSandbox]]:
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.fail(f"no cgroup2 mount at {UNIFIED} on this host")
    driver = CgroupV2Driver(UNIFIED, ProcFS())
    rel = f"{test_cgroup.rel}/app"
    (UNIFIED / rel.lstrip("/")).mkdir()
    yield driver, rel, test_cgroup
    # The sandbox's cleanup kills and removes the rest.


def _events(driver: CgroupV2Driver, rel: str) -> dict[str, str]:
    text = (Path(driver.display_path(rel)) / "cgroup.events").read_text()
    return dict(line.split(" ", 1) for line in text.split("\n") if line)


def _spawn_into(box: CgroupSandbox, driver: CgroupV2Driver, rel: str) -> subprocess.Popen[bytes]:
    child = box.spawn(SLEEPER)
    # Wait for the launcher to have joined the sandbox: on a slow host (the VM) a fixed sleep
    # let its own write to the sandbox's cgroup.procs land after this move and undo it.
    deadline = time.monotonic() + 10
    while child.pid not in driver.members(box.rel):
        assert time.monotonic() < deadline, "the child never joined the sandbox"
        time.sleep(0.01)
    driver.move(child.pid, rel)
    return child


def test_move_membership_and_events(v2: tuple[CgroupV2Driver, str, CgroupSandbox]) -> None:
    driver, rel, box = v2
    assert _events(driver, rel)["populated"] == "0"
    child = _spawn_into(box, driver, rel)
    assert driver.members(rel) == [child.pid]
    assert driver.contains(rel, child.pid)
    assert driver.cgroup_of(child.pid) == rel
    assert child.pid in driver.subtree_members(box.rel)
    assert driver.inode(rel) == (UNIFIED / rel.lstrip("/")).stat().st_ino
    assert _events(driver, rel)["populated"] == "1"


def test_freeze_waits_for_frozen_and_thaw_resumes(
    v2: tuple[CgroupV2Driver, str, CgroupSandbox],
) -> None:
    driver, rel, box = v2
    child = _spawn_into(box, driver, rel)
    driver.apply(rel, Limits(frozen=True))  # returns once cgroup.events says "frozen 1"
    assert _events(driver, rel)["frozen"] == "1"
    assert driver.read_knobs(rel, ["frozen"]) == {"frozen": "1"}
    driver.apply(rel, Limits(frozen=False))
    assert (Path(driver.display_path(rel)) / "cgroup.freeze").read_text().strip() == "0"
    assert child.poll() is None


def test_cgroup_kill_kills_the_whole_subtree(v2: tuple[CgroupV2Driver, str, CgroupSandbox]) -> None:
    driver, rel, box = v2
    inner = f"{rel}/inner"
    (UNIFIED / inner.lstrip("/")).mkdir()
    children = [_spawn_into(box, driver, rel), _spawn_into(box, driver, inner)]
    assert driver.kill_all(rel)
    for child in children:
        assert child.wait(5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while _events(driver, rel)["populated"] != "0" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _events(driver, rel)["populated"] == "0"
    driver.remove(rel)
    assert not driver.exists(rel)


def test_a_cgroup_scope_kill_uses_cgroup_kill_through_the_reach_gate(
    pin: Callable[..., Subject],
    v2: tuple[CgroupV2Driver, str, CgroupSandbox],
) -> None:
    driver, rel, box = v2
    offender, other = _spawn_into(box, driver, rel), _spawn_into(box, driver, rel)
    ctx = ActionContext(driver, ProcFS(), scope="cgroup")
    detail = Kill().run(KillParams(quarantine=False), pin(offender.pid, driver, rel), ctx)
    assert "cgroup.kill" in detail
    assert offender.wait(5) == -signal.SIGKILL and other.wait(5) == -signal.SIGKILL


def test_the_reach_gate_refuses_cgroup_kill_over_a_protected_process_below(
    pin: Callable[..., Subject],
    v2: tuple[CgroupV2Driver, str, CgroupSandbox],
) -> None:
    driver, rel, box = v2
    inner = f"{rel}/inner"
    (UNIFIED / inner.lstrip("/")).mkdir()
    offender, protected = _spawn_into(box, driver, rel), _spawn_into(box, driver, inner)

    def spare(info: ProcessInfo) -> str | None:
        return "protected by the test" if info.pid == protected.pid else None

    ctx = ActionContext(driver, ProcFS(), scope="cgroup", spare=spare)
    with pytest.raises(ProtectedProcess):
        Kill().run(KillParams(quarantine=False), pin(offender.pid, driver, rel), ctx)
    assert offender.poll() is None and protected.poll() is None
