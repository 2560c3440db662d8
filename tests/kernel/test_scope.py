"""Offender scope on real cgroups and real processes (all spawned by this test, inside its
pids-limited cgroup): process, tree (the offender and its descendants), cgroup (all of it)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import detect
from remedy.actions.kill import Kill
from remedy.actions.params import KillParams, QuarantineParams
from remedy.actions.process import ProcessHandle
from remedy.actions.quarantine import Quarantine
from remedy.engine.offender import Subject
from remedy.errors import ProtectedProcess
from remedy.proc import ProcessInfo, ProcFS
from testkit.sandbox import CgroupSandbox

pytestmark = pytest.mark.root

# A parent with three sleeping children: a small tree to act on.
TREE = """
import os, time
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
print(" ".join(map(str, kids)), flush=True)
time.sleep(30)
"""


@pytest.fixture
def tree(test_cgroup: CgroupSandbox) -> Iterator[tuple[Subject, list[int]]]:
    import subprocess  # noqa: PLC0415

    parent = test_cgroup.spawn([sys.executable, "-c", TREE], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    kids = [int(x) for x in parent.stdout.readline().split()]
    procfs = ProcFS()
    cgroups = detect()
    handle = ProcessHandle.bind(parent.pid, procfs)
    info = handle.info
    subject = Subject(
        pid=info.pid,
        start_ticks=info.start_ticks,
        comm=info.comm,
        ppid=info.ppid,
        exe=info.exe,
        uid=info.uid,
        is_kernel_thread=False,
        cgroup=cgroups.cgroup_of(info.pid),
        cgroup_display=cgroups.display_path(cgroups.cgroup_of(info.pid)),
        handle=handle,
        cgroup_inode=cgroups.inode(cgroups.cgroup_of(info.pid)),  # as identification reads it
    )
    try:
        yield subject, kids
    finally:
        handle.close()


def _ctx(box: CgroupSandbox, scope: str, spare: set[int] | None = None) -> ActionContext:
    spared = spare or set()

    def spare_fn(info: ProcessInfo) -> str | None:
        return "spared by the test" if info.pid in spared else None

    return ActionContext(detect(), ProcFS(), f"{box.rel}/q", scope=scope, spare=spare_fn)


def _alive(pids: list[int]) -> list[int]:
    procfs = ProcFS()
    alive = []
    for pid in pids:
        try:
            if procfs.read(pid).state != "Z":
                alive.append(pid)
        except Exception:
            continue
    return alive


def _wait_dead(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + 5
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _alive(pids)


def test_scope_process_moves_only_the_offender(
    test_cgroup: CgroupSandbox, tree: tuple[Subject, list[int]]
) -> None:
    subject, _kids = tree
    ctx = _ctx(test_cgroup, "process")
    Quarantine().run(QuarantineParams(pids_max=16), subject, ctx)
    assert ctx.cgroups.members(ctx.quarantine_of(subject)) == [subject.pid]


def test_scope_tree_moves_and_kills_the_descendants_too(
    test_cgroup: CgroupSandbox, tree: tuple[Subject, list[int]]
) -> None:
    subject, kids = tree
    ctx = _ctx(test_cgroup, "tree")
    assert "with its descendants" in Quarantine().describe(QuarantineParams(), subject, ctx)
    Quarantine().run(QuarantineParams(pids_max=16), subject, ctx)
    assert sorted(ctx.cgroups.members(ctx.quarantine_of(subject))) == sorted([subject.pid, *kids])
    detail = Kill().run(KillParams(quarantine=False), subject, ctx)
    assert "3 process(es) of its tree scope" in detail
    assert _wait_dead([subject.pid, *kids]) == []


def test_scope_cgroup_caps_in_place_and_kills_every_member(
    test_cgroup: CgroupSandbox, tree: tuple[Subject, list[int]]
) -> None:
    subject, kids = tree
    ctx = _ctx(test_cgroup, "cgroup")
    Quarantine().run(QuarantineParams(pids_max=50, cpu=0.5), subject, ctx)
    assert (test_cgroup.pids_dir / "pids.max").read_text().strip() == "50"
    assert not ctx.cgroups.exists(ctx.quarantine_of(subject))  # nothing was moved
    Kill().run(KillParams(quarantine=False), subject, ctx)
    assert _wait_dead([subject.pid, *kids]) == []


def test_scope_cgroup_with_a_protected_member_is_refused_whole(
    test_cgroup: CgroupSandbox, tree: tuple[Subject, list[int]]
) -> None:
    """A cap, freeze or kill of the cgroup would reach the protected member too: the reach
    gate refuses the whole action rather than doing part of it."""
    subject, kids = tree
    ctx = _ctx(test_cgroup, "cgroup", spare={kids[0]})
    with pytest.raises(ProtectedProcess):
        Quarantine().run(QuarantineParams(pids_max=50, cpu=0.5), subject, ctx)
    assert (test_cgroup.pids_dir / "pids.max").read_text().strip() != "50"
    with pytest.raises(ProtectedProcess):
        Kill().run(KillParams(quarantine=False), subject, ctx)
    assert sorted(_alive([subject.pid, *kids])) == sorted([subject.pid, *kids])


def test_scope_cgroup_sigkill_freezes_signals_and_thaws_on_v1(
    test_cgroup: CgroupSandbox, tree: tuple[Subject, list[int]]
) -> None:
    subject, kids = tree
    if test_cgroup.v2:
        pytest.skip("v1 path; v2's cgroup.kill is covered against a directory tree")
    freezer = Path("/sys/fs/cgroup/freezer") / test_cgroup.name
    freezer.mkdir()
    try:
        for pid in [subject.pid, *kids]:
            (freezer / "cgroup.procs").write_text(str(pid))
        detail = Kill().run(KillParams(quarantine=False), subject, _ctx(test_cgroup, "cgroup"))
        assert "froze" in detail and "thawed" in detail
        assert _wait_dead([subject.pid, *kids]) == []
        assert (freezer / "freezer.state").read_text().strip() == "THAWED"
    finally:
        for _ in range(50):
            try:
                freezer.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_scope_tree_leaves_a_sibling_alone(
    test_cgroup: CgroupSandbox, tree: tuple[Subject, list[int]]
) -> None:
    subject, kids = tree
    sibling = test_cgroup.spawn(["sleep", "30"])
    Kill().run(KillParams(quarantine=False), subject, _ctx(test_cgroup, "tree"))
    assert _wait_dead([subject.pid, *kids]) == []
    assert sibling.poll() is None, "a process outside the tree is not ours to kill"
