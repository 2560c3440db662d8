"""CgroupV1Driver against the real v1 hierarchies of this machine (root only).

Every test works under a uniquely named top cgroup; the fixture kills the children it spawned
and removes that cgroup from every hierarchy, deepest first, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remedy.actions.cgroups import (
    CgroupV1Driver,
    FreezerController,
    Limits,
    PidsController,
    RemedyNode,
    detect,
)
from remedy.errors import CgroupError, ProcessGone
from remedy.proc import ProcFS

ROOT = Path("/sys/fs/cgroup")
HIERARCHIES = ("pids", "cpu", "freezer")


def v1_mounts() -> set[str]:
    """Mount points of cgroup v1 hierarchies, from /proc/self/mountinfo."""
    points: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # "... mount-point ... - fstype source super-options" (proc(5))
        before, _, after = line.partition(" - ")
        if after.split()[0] == "cgroup":
            points.add(before.split()[4])
    return points


def v1_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    missing = [h for h in ("pids", "cpu") if str(ROOT / h) not in v1_mounts()]
    if missing:
        return f"no cgroup v1 mount at {', '.join(str(ROOT / h) for h in missing)}"
    return None


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(v1_unavailable() is not None, reason=str(v1_unavailable())),
]


@dataclass
class V1Box:
    """The test's own top cgroup and the children it spawned."""

    driver: CgroupV1Driver
    top: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "30"])
        self.children.append(child)
        return child

    def rel(self, sub: str) -> str:
        return f"{self.top}/{sub}"


def rmdir_deepest_first(top: Path) -> None:
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        for _ in range(50):  # a killed task leaves its cgroup at exit, shortly after SIGKILL
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def box() -> Iterator[V1Box]:
    name = f"remedy-test-{uuid.uuid4().hex}"
    b = V1Box(CgroupV1Driver(ROOT, ProcFS()), f"/{name}")
    try:
        yield b
    finally:
        for child in b.children:
            if child.poll() is None:
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        for hierarchy in HIERARCHIES:
            rmdir_deepest_first(ROOT / hierarchy / name)
        leftover = [h for h in HIERARCHIES if (ROOT / h / name).exists()]
        assert not leftover, f"test cgroup left behind in {leftover}"


def test_detect_on_this_machine() -> None:
    driver = detect()
    assert isinstance(driver, CgroupV1Driver)
    assert (driver.version, driver.root) == (1, ROOT)


def test_create_move_members_remove(box: V1Box) -> None:
    rel = box.rel("q")
    driver = box.driver
    driver.create(rel, Limits(pids_max=8, cpu_cores=0.5))
    assert driver.exists(rel)
    pids_dir, cpu_dir = ROOT / "pids" / rel[1:], ROOT / "cpu" / rel[1:]
    assert driver.display_path(rel) == str(pids_dir)
    assert (pids_dir / "pids.max").read_text().strip() == "8"
    assert (cpu_dir / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "50000"

    child = box.spawn()
    assert not driver.contains(rel, child.pid)
    driver.move(child.pid, rel)
    assert driver.members(rel) == [child.pid]
    assert driver.contains(rel, child.pid)
    assert driver.cgroup_of(child.pid) == rel
    assert ProcFS().cgroups(child.pid)["cpu"] == rel

    child.kill()
    child.wait(5)
    driver.remove(rel)
    assert not driver.exists(rel)
    assert not cpu_dir.exists()


def test_create_is_idempotent(box: V1Box) -> None:
    rel = box.rel("a/b")
    box.driver.create(rel, Limits(pids_max=8))
    box.driver.create(rel, Limits(pids_max=16, cpu_cores=1.5))
    assert (ROOT / "pids" / rel[1:] / "pids.max").read_text().strip() == "16"
    assert (ROOT / "cpu" / rel[1:] / "cpu.cfs_quota_us").read_text().strip() == "150000"
    box.driver.remove(box.top)
    assert not box.driver.exists(box.top)


def test_remove_refuses_while_populated(box: V1Box) -> None:
    rel = box.rel("busy")
    box.driver.create(rel, Limits(pids_max=4))
    child = box.spawn()
    box.driver.move(child.pid, rel)
    with pytest.raises(CgroupError, match="still has processes") as exc:
        box.driver.remove(rel)
    assert exc.value.cgroup == rel
    child.kill()
    child.wait(5)
    box.driver.remove(rel)
    box.driver.remove(rel)  # already gone: fine


def test_move_of_a_gone_pid_is_process_gone(box: V1Box) -> None:
    rel = box.rel("q")
    box.driver.create(rel, Limits())
    gone = int(Path("/proc/sys/kernel/pid_max").read_text())  # never a live pid
    with pytest.raises(ProcessGone) as exc:
        box.driver.move(gone, rel)
    assert (exc.value.pid, exc.value.cgroup) == (gone, rel)


def test_missing_cgroup(box: V1Box) -> None:
    rel = box.rel("never-created")
    assert box.driver.members(rel) == []
    assert not box.driver.exists(rel)
    with pytest.raises(CgroupError):
        box.driver.move(os.getpid(), rel)


def test_cgroupspy_nodes_know_pids_and_freezer(box: V1Box) -> None:
    rel = box.rel("q")
    box.driver.create(rel, Limits(pids_max=5))
    child = box.spawn()
    box.driver.move(child.pid, rel)
    node = RemedyNode(b"pids", parent=RemedyNode(os.fsencode(ROOT)))
    for part in rel.strip("/").split("/"):
        node = RemedyNode(part.encode(), parent=node)
    assert isinstance(node.controller, PidsController)
    assert node.controller.max == 5
    assert node.controller.current == 1
    node.controller.max = None
    assert (ROOT / "pids" / rel[1:] / "pids.max").read_text().strip() == "max"

    freezer_dir = ROOT / "freezer" / box.top[1:]
    if not freezer_dir.parent.is_dir():
        pytest.skip("no v1 freezer hierarchy")
    freezer_dir.mkdir()
    top = RemedyNode(b"freezer", parent=RemedyNode(os.fsencode(ROOT)))
    freezer = RemedyNode(freezer_dir.name.encode(), parent=top)
    assert isinstance(freezer.controller, FreezerController)
    assert freezer.controller.state == "THAWED"


def test_remove_removes_nothing_while_any_hierarchy_holds_a_process(box: V1Box) -> None:
    rel = box.rel("half")
    box.driver.create(rel, Limits(pids_max=4))
    child = box.spawn()
    # Half moved back: home in pids, still in the quarantine for cpu (capped there).
    (ROOT / "cpu" / rel[1:] / "cgroup.procs").write_text(str(child.pid))
    assert box.driver.members(rel) == [] and box.driver.members_anywhere(rel) == [child.pid]
    with pytest.raises(CgroupError, match="still has processes"):
        box.driver.remove(rel)
    assert (ROOT / "pids" / rel[1:]).is_dir()  # the record's sign of it stays
    origins = {"pids": "/", "cpu": "/"}
    box.driver.restore(child.pid, rel, origins)
    assert ProcFS().cgroups(child.pid)["cpu"] == "/"
    box.driver.remove(rel)
    assert not (ROOT / "cpu" / rel[1:]).exists()
