"""Identification against fixture /proc and cgroup trees: cgroup namespaces ("/.."), faked
/proc/pid/cgroup lines, and the pidfd that must never leak.

The process pinned is this test process itself (pidfd_open needs a live pid); what /proc says
about it comes from the fixture tree, so every path here is the test's own choice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from remedy.actions.cgroups import CgroupV1Driver, CgroupV2Driver
from remedy.engine.offender import Subject
from remedy.errors import ActionError, CgroupError, IdentityUnverified
from remedy.proc import ProcFS
from remedy.sensors.context import CgroupIndex, Enricher, ParentChain
from remedy.sensors.identify import ProcIdentifier
from remedy.sensors.records import SensorRecord

ME = os.getpid()
FAKE = "/deleg/x\n0::/system.slice/victim.service"  # a cgroup name faking a second v2 line


def write_proc(root: Path, pid: int, cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    after = ["S", "1", str(pid), str(pid), "0", "-1", "4194304"]
    after += [str(n) for n in range(10, 22)] + ["1", "12345", "67"]  # started at tick 1
    (d / "stat").write_text(f"{pid} (victim) {' '.join(after)}\n")
    (d / "status").write_text("Name:\tvictim\nUid:\t1000\t1000\t1000\t1000\n")
    (d / "cmdline").write_bytes(b"victim\0")
    (d / "cgroup").write_text(cgroup)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


def reader_layout(proc: Path, layout: str) -> None:
    """The reader's own /proc/self/cgroup: where every file's lines start."""
    (proc / "10").mkdir()
    (proc / "10" / "cgroup").write_text(layout)
    (proc / "self").symlink_to("10")


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    """A cgroup2 mount: the host's view of a container's cgroup and the victim's."""
    root = tmp_path / "cgroup"
    for rel in (
        "ns/app",
        "system.slice/victim.service",
        "deleg/x\n0::/system.slice/victim.service",
    ):
        (root / rel).mkdir(parents=True)
        (root / rel / "cgroup.procs").write_text("")
    (root / "cgroup.controllers").write_text("cpu pids\n")
    (root / "cgroup.procs").write_text("1\n")
    return root


def record(cgroup_id: int = 0, signal: str = "fork_rate", tgid: int = ME) -> SensorRecord:
    return SensorRecord(
        signal=signal,
        tgid=tgid,
        pid=tgid,
        ppid=1,
        comm="victim",
        cgroup_id=cgroup_id,
        count=200,
        window_s=1.0,
        elapsed_s=0.1,
        ts_boot_ns=2**62,  # long after tick 1: the pinned process started before the record
        key=ME if signal == "exec_rate" else tgid,
        # Born at tick 1, as the fixture's stat says (no kernel births map here: ticks only).
        birth_ns=1_000_000_000 // os.sysconf("SC_CLK_TCK"),
        key_birth_ns=1_000_000_000 // os.sysconf("SC_CLK_TCK"),
    )


def identifier(proc: Path, mount: Path) -> ProcIdentifier:
    procfs = ProcFS(proc)
    index = CgroupIndex(mount, min_rescan_s=0.0)
    enricher = Enricher(procfs, index, ParentChain(procfs))
    return ProcIdentifier(procfs, CgroupV2Driver(mount, procfs), enricher)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def subjects() -> Iterator[list[Subject]]:
    found: list[Subject] = []
    yield found
    for subject in found:
        if subject.handle is not None:
            subject.handle.close()


@pytest.mark.parametrize("path", ["/..", "/../..", "/../other/app"])
def test_a_namespaced_path_is_refused_and_leaks_no_pidfd(
    proc: Path, mount: Path, path: str
) -> None:
    write_proc(proc, ME, f"0::{path}\n")
    ident = identifier(proc, mount)
    before = open_fds()
    refusals = []
    for _ in range(20):
        with pytest.raises(ActionError) as exc:
            ident.identify(record())  # cgroup id unknown to the index: no host view
        refusals.append(exc.value)
    assert open_fds() == before
    assert {err.pid for err in refusals} == {ME}


def test_a_namespaced_path_resolves_through_the_host_view(
    proc: Path, mount: Path, subjects: list[Subject]
) -> None:
    write_proc(proc, ME, "0::/../app\n")  # the reader's namespace is rooted at a sibling
    (mount / "ns" / "app" / "cgroup.procs").write_text(f"{ME}\n")
    cgroup_id = (mount / "ns" / "app").stat().st_ino
    subjects.append(identifier(proc, mount).identify(record(cgroup_id)))
    assert subjects[0].cgroup == "/ns/app"
    assert subjects[0].cgroup_display == str(mount / "ns" / "app")


def test_the_host_view_needs_the_pid_in_cgroup_procs(proc: Path, mount: Path) -> None:
    write_proc(proc, ME, "0::/../app\n")
    cgroup_id = (mount / "ns" / "app").stat().st_ino  # its cgroup.procs does not list us
    before = open_fds()
    with pytest.raises(CgroupError) as exc:
        identifier(proc, mount).identify(record(cgroup_id))
    assert exc.value.pid == ME
    assert open_fds() == before


def test_the_host_view_is_not_used_for_a_parent_keyed_record(proc: Path, mount: Path) -> None:
    # exec_rate names the parent; the cgroup id is the child's, which may live elsewhere.
    write_proc(proc, ME, "0::/../app\n")
    (mount / "ns" / "app" / "cgroup.procs").write_text(f"{ME}\n")
    cgroup_id = (mount / "ns" / "app").stat().st_ino
    with pytest.raises(CgroupError):
        identifier(proc, mount).identify(record(cgroup_id, "exec_rate", tgid=ME + 1))


def test_the_v1_driver_refuses_a_namespaced_path(proc: Path, tmp_path: Path) -> None:
    write_proc(proc, ME, "8:pids:/../x\n0::/\n")
    with pytest.raises(CgroupError) as exc:
        CgroupV1Driver(tmp_path, ProcFS(proc)).cgroup_of(ME)
    assert exc.value.pid == ME


def test_on_pure_v2_the_path_is_the_whole_line(
    proc: Path, mount: Path, subjects: list[Subject]
) -> None:
    # One hierarchy: "0::" + path + "\n" and nothing else, so a faked line is only text.
    reader_layout(proc, "0::/\n")
    write_proc(proc, ME, f"0::{FAKE}\n")
    subjects.append(identifier(proc, mount).identify(record()))
    assert subjects[0].cgroup == FAKE


def test_a_faked_v2_line_is_proven_by_membership(
    proc: Path, mount: Path, subjects: list[Subject]
) -> None:
    # On a hybrid layout the fake line also moves where the pids line could end.
    reader_layout(proc, "8:pids:/\n0::/\n")
    write_proc(proc, ME, f"8:pids:/\n0::{FAKE}\n")
    (mount / FAKE.lstrip("/") / "cgroup.procs").write_text(f"{ME}\n")
    subjects.append(identifier(proc, mount).identify(record()))
    assert subjects[0].cgroup == FAKE


def test_an_unproven_faked_line_is_refused_not_guessed(proc: Path, mount: Path) -> None:
    # Neither reading's cgroup.procs lists the pid (it moved since, say).
    reader_layout(proc, "8:pids:/\n0::/\n")
    write_proc(proc, ME, f"8:pids:/\n0::{FAKE}\n")
    before = open_fds()
    with pytest.raises(ActionError) as exc:
        identifier(proc, mount).identify(record())
    assert exc.value.pid == ME
    assert open_fds() == before


def test_the_v1_driver_proves_the_pids_reading_by_membership(proc: Path, tmp_path: Path) -> None:
    root = tmp_path / "v1"
    for rel in ("pids/user.slice", "pids/user.slice\n0::/deleg/x", "cpu"):
        (root / rel).mkdir(parents=True)
    (root / "pids" / "user.slice" / "cgroup.procs").write_text(f"{ME}\n")
    (root / "pids" / "user.slice\n0::/deleg/x" / "cgroup.procs").write_text("")
    # The v2 name fakes a "0::" line, so where the pids path ends is ambiguous.
    reader_layout(proc, "8:pids:/\n0::/\n")
    write_proc(proc, ME, "8:pids:/user.slice\n0::/deleg/x\n0::/system.slice/victim.service\n")
    assert CgroupV1Driver(root, ProcFS(proc)).cgroup_of(ME) == "/user.slice"


def test_a_record_counted_in_another_cgroup_is_refused(proc: Path, mount: Path) -> None:
    """The kernel counted the task in one cgroup2 directory; /proc's path resolves to another
    (a forged or racing path): what would be acted on is not what was counted."""
    write_proc(proc, ME, "0::/system.slice/victim.service\n")
    counted_in = (mount / "ns" / "app").stat().st_ino
    before = open_fds()
    with pytest.raises(IdentityUnverified, match="not the one the kernel counted"):
        identifier(proc, mount).identify(record(counted_in))
    assert open_fds() == before


def test_a_record_counted_in_its_own_cgroup_is_bound_with_its_inode(
    proc: Path, mount: Path, subjects: list[Subject]
) -> None:
    write_proc(proc, ME, "0::/system.slice/victim.service\n")
    inode = (mount / "system.slice" / "victim.service").stat().st_ino
    subjects.append(identifier(proc, mount).identify(record(inode)))
    assert subjects[0].cgroup_inode == inode  # the reach gate compares with this
