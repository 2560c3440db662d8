"""Taking a quarantine back from a process that forks, on real cgroups (root). Every process is
the test's own, inside its pids-limited cgroup.

A member that forks between the revert's read of the quarantine's members and its own move
leaves a child born in the quarantine. A live fork storm did so in about one reconcile in
three (tests/kernel/test_agent_fault_injection.py): the revert failed, the quarantine stayed
past its TTL and was retried only after its back-off. Here the interleaving is made certain: a
child is born in the quarantine during the first move back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import detect
from remedy.actions.params import QuarantineParams
from remedy.actions.quarantine import Quarantine
from remedy.engine.offender import Subject
from remedy.proc import ProcFS
from testkit.launcher import in_cgroups
from testkit.sandbox import CGROUP_ROOT, CgroupSandbox

pytestmark = pytest.mark.root


def _until(what: str, done: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_child_born_in_the_quarantine_during_the_move_back_goes_home_too(
    test_cgroup: CgroupSandbox,
    pin: Callable[..., Subject],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    procfs = ProcFS()
    driver = detect(CGROUP_ROOT, procfs)
    ctx = ActionContext(driver, procfs, f"{test_cgroup.rel}/quarantine")
    parent = test_cgroup.spawn(["sleep", "30"])
    _until("the sleeper in its cgroup", lambda: parent.pid in driver.members(test_cgroup.rel))
    subject = pin(parent.pid, driver)
    action, params = Quarantine(), QuarantineParams(pids_max=8, cpu=0.5)
    record = action.undo(params, subject, ctx, policy="t", ttl_s=3, now_wall=time.time())
    action.run(params, subject, ctx)
    rel = record.cgroup
    assert parent.pid in driver.members(rel)

    real_restore = driver.restore
    born: list[subprocess.Popen[bytes]] = []

    def restore_while_a_child_is_born(pid: int, where: str, origins: dict[str, str]) -> None:
        if not born:  # the offender forks right after the members were read
            dirs = [CGROUP_ROOT / h / where.lstrip("/") for h in ("pids", "cpu", "unified")]
            procs = [d / "cgroup.procs" for d in dirs if d.is_dir()]
            if driver.version == 2:
                procs = [CGROUP_ROOT / where.lstrip("/") / "cgroup.procs"]
            child = subprocess.Popen(in_cgroups(procs, ["sleep", "30"]))
            test_cgroup.procs.append(child)  # killed and reaped by the fixture's cleanup
            born.append(child)
            _until("the child in the quarantine", lambda: child.pid in driver.members(where))
        real_restore(pid, where, origins)

    monkeypatch.setattr(driver, "restore", restore_while_a_child_is_born)
    detail = action.revert(record, ctx)

    assert born, "the interleaving was not made"
    assert "moved 2 task(s) back" in detail, detail
    assert driver.members_anywhere(rel) == []
    home = driver.members(test_cgroup.rel)
    assert parent.pid in home and born[0].pid in home
    assert not driver.exists(rel), "the quarantine was removed"
