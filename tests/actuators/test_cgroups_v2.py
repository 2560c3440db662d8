"""CgroupV2Driver against a directory tree in tmp_path shaped like a cgroup2 mount.

A plain filesystem does not create interface files on mkdir as kernfs does, so the driver must
not need them to appear; the fixture's rmdir drops them the way kernfs does on rmdir.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from remedy.actions.cgroups import INHERITED, CgroupV1Driver, CgroupV2Driver, Limits, detect
from remedy.errors import CgroupError, ProcessGone
from remedy.proc import ProcFS

CHILD_PID = 4242


def kernfs_rmdir(path: Path) -> None:
    """rmdir as on cgroupfs: interface files go with the directory, child cgroups do not."""
    for entry in path.iterdir():
        if entry.is_file():
            entry.unlink()
    os.rmdir(path)


@pytest.fixture
def cg_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    (root / "cgroup.procs").write_text("1\n2\n")
    # An existing parent with only one of the two controllers enabled.
    remedy = root / "remedy"
    remedy.mkdir()
    (remedy / "cgroup.controllers").write_text("cpu memory pids\n")
    (remedy / "cgroup.subtree_control").write_text("pids\n")
    (remedy / "cgroup.procs").write_text("")
    return root


@pytest.fixture
def procfs(tmp_path: Path) -> ProcFS:
    proc = tmp_path / "proc"
    (proc / str(CHILD_PID)).mkdir(parents=True)
    (proc / str(CHILD_PID) / "cgroup").write_text("0::/user.slice/app\n")
    (proc / "7").mkdir()
    (proc / "7" / "cgroup").write_text("4:pids:/only-v1\n")
    return ProcFS(proc)


@pytest.fixture
def driver(cg_root: Path, procfs: ProcFS) -> CgroupV2Driver:
    return CgroupV2Driver(cg_root, procfs, rmdir=kernfs_rmdir)


def test_detect_v2(cg_root: Path, procfs: ProcFS) -> None:
    found = detect(cg_root, procfs)
    assert isinstance(found, CgroupV2Driver)
    assert (found.version, found.root) == (2, cg_root)


def test_detect_v2_without_pids_names_it(cg_root: Path) -> None:
    (cg_root / "cgroup.controllers").write_text("cpu memory\n")
    with pytest.raises(CgroupError, match="pids"):
        detect(cg_root)


def test_detect_nothing_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=r"cgroup\.controllers.*pids/tasks"):
        detect(tmp_path)


def test_create_writes_limits_and_enables_controllers(
    driver: CgroupV2Driver, cg_root: Path
) -> None:
    driver.create("/remedy/q-42-1000/inner", Limits(pids_max=8, cpu_cores=0.2))
    target = cg_root / "remedy" / "q-42-1000" / "inner"
    assert (target / "pids.max").read_text() == "8"
    assert (target / "cpu.max").read_text() == "20000 100000"
    # Each ancestor from the root down gets only what it lacks.
    assert (cg_root / "cgroup.subtree_control").read_text() == "+pids +cpu"
    assert (cg_root / "remedy" / "cgroup.subtree_control").read_text() == "+cpu"
    assert (cg_root / "remedy" / "q-42-1000" / "cgroup.subtree_control").read_text() == (
        "+pids +cpu"
    )
    # The target itself has no children to delegate to.
    assert not (target / "cgroup.subtree_control").exists()
    assert driver.exists("/remedy/q-42-1000/inner")


def test_create_leaves_enabled_ancestors_alone(driver: CgroupV2Driver, cg_root: Path) -> None:
    (cg_root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (cg_root / "remedy" / "cgroup.subtree_control").write_text("cpu pids\n")
    driver.create("/remedy/q", Limits(pids_max=3))
    assert (cg_root / "cgroup.subtree_control").read_text() == "cpu memory pids\n"
    assert (cg_root / "remedy" / "cgroup.subtree_control").read_text() == "cpu pids\n"
    assert not (cg_root / "remedy" / "q" / "cpu.max").exists()


def test_create_below_a_populated_cgroup_is_refused_before_any_write(
    driver: CgroupV2Driver, cg_root: Path
) -> None:
    """cgroup v2's no-internal-processes rule: the kernel would take +pids +cpu (threaded
    controllers) in a cgroup with processes and make it a thread root, breaking its domain
    children. Refused before anything is written (the VM shows the kernel doing it:
    vmtest/guest/test_v2_controllers.py)."""
    (cg_root / "remedy" / "cgroup.procs").write_text("4242\n")
    with pytest.raises(CgroupError, match="processes of its own") as exc:
        driver.create("/remedy/q", Limits(pids_max=4))
    assert exc.value.cgroup == "/remedy/q"
    assert (cg_root / "remedy" / "cgroup.subtree_control").read_text() == "pids\n"
    assert not (cg_root / "remedy" / "q").exists()
    # The root cgroup is exempt from the rule (its processes are the host's).
    driver.create("/q", Limits(pids_max=4))


def test_a_limit_in_place_enables_its_controller_in_the_ancestors_first(
    driver: CgroupV2Driver, cg_root: Path
) -> None:
    """A cgroup systemd made (not by remedy) has cpu.max only once its parent enabled +cpu;
    on cgroupfs, writing the missing file is EACCES (seen in make vmtest)."""
    (cg_root / "remedy" / "svc").mkdir()
    driver.apply("/remedy/svc", Limits(cpu_cores=0.5))
    assert (cg_root / "cgroup.subtree_control").read_text() == "+cpu"
    assert (cg_root / "remedy" / "cgroup.subtree_control").read_text() == "+cpu"
    assert (cg_root / "remedy" / "svc" / "cpu.max").read_text() == "50000 100000"
    assert not (cg_root / "remedy" / "svc" / "cgroup.subtree_control").exists()


def test_create_is_idempotent_and_rewrites_limits(driver: CgroupV2Driver, cg_root: Path) -> None:
    driver.create("/remedy/q", Limits(pids_max=8, cpu_cores=0.5))
    driver.create("/remedy/q", Limits(pids_max=16, cpu_cores=2.0))
    assert (cg_root / "remedy" / "q" / "pids.max").read_text() == "16"
    assert (cg_root / "remedy" / "q" / "cpu.max").read_text() == "200000 100000"


def test_tiny_cpu_share_is_raised_to_the_kernel_minimum(
    driver: CgroupV2Driver, cg_root: Path
) -> None:
    driver.create("/q", Limits(cpu_cores=0.001))
    assert (cg_root / "q" / "cpu.max").read_text() == "1000 100000"


def test_move_members_contains(driver: CgroupV2Driver, cg_root: Path) -> None:
    driver.create("/remedy/q", Limits(pids_max=8))
    assert driver.members("/remedy/q") == []
    driver.move(CHILD_PID, "/remedy/q")
    assert (cg_root / "remedy" / "q" / "cgroup.procs").read_text() == str(CHILD_PID)
    assert driver.members("/remedy/q") == [CHILD_PID]
    assert driver.contains("/remedy/q", CHILD_PID)
    assert not driver.contains("/remedy/q", 1)
    assert driver.members("/") == [1, 2]


def test_members_of_a_missing_cgroup_is_empty(driver: CgroupV2Driver) -> None:
    assert driver.members("/nope") == []
    assert not driver.exists("/nope")


def test_move_of_an_exited_pid_is_process_gone(
    driver: CgroupV2Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver.create("/q", Limits())

    def esrch(self: Path, data: str) -> int:
        raise ProcessLookupError(errno.ESRCH, "No such process")

    monkeypatch.setattr(Path, "write_text", esrch)
    with pytest.raises(ProcessGone) as exc:
        driver.move(CHILD_PID, "/q")
    assert (exc.value.pid, exc.value.cgroup) == (CHILD_PID, "/q")


def test_move_into_a_missing_cgroup_is_cgroup_error(driver: CgroupV2Driver) -> None:
    with pytest.raises(CgroupError) as exc:
        driver.move(CHILD_PID, "/nope")
    assert exc.value.cgroup == "/nope"
    assert isinstance(exc.value.__cause__, FileNotFoundError)


def test_cgroup_of_and_display_path(driver: CgroupV2Driver, cg_root: Path) -> None:
    assert driver.cgroup_of(CHILD_PID) == "/user.slice/app"
    assert driver.display_path("/user.slice/app") == str(cg_root / "user.slice" / "app")
    with pytest.raises(CgroupError):
        driver.cgroup_of(7)  # a v1-only line
    with pytest.raises(ProcessGone):
        driver.cgroup_of(31337)


def test_remove_deepest_first_and_missing_is_fine(driver: CgroupV2Driver, cg_root: Path) -> None:
    driver.create("/remedy/q/a/b", Limits(pids_max=8, cpu_cores=0.5))
    driver.remove("/remedy/q")
    assert not (cg_root / "remedy" / "q").exists()
    assert (cg_root / "remedy").is_dir()
    driver.remove("/remedy/q")


def test_remove_busy_is_cgroup_error(cg_root: Path, procfs: ProcFS) -> None:
    def busy(path: Path) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    driver = CgroupV2Driver(cg_root, procfs, rmdir=busy)
    driver.create("/q", Limits())
    with pytest.raises(CgroupError, match="still has processes") as exc:
        driver.remove("/q")
    assert exc.value.cgroup == "/q"


@pytest.mark.parametrize("rel", ["relative", "/a/../b", "/a/./b", ""])
def test_bad_paths_are_refused(driver: CgroupV2Driver, rel: str) -> None:
    with pytest.raises(CgroupError):
        driver.exists(rel)
    with pytest.raises(CgroupError):
        driver.create(rel, Limits())


def test_root_is_never_created_or_removed(driver: CgroupV2Driver, cg_root: Path) -> None:
    with pytest.raises(CgroupError, match="root"):
        driver.remove("/")
    with pytest.raises(CgroupError, match="root"):
        driver.create("/", Limits(pids_max=1))
    assert (cg_root / "cgroup.procs").exists()


def test_write_errors_become_cgroup_errors(driver: CgroupV2Driver, cg_root: Path) -> None:
    # A directory where the limit file should be: the write fails with EISDIR.
    driver.create("/q", Limits())
    (cg_root / "q" / "pids.max").mkdir()
    with pytest.raises(CgroupError, match="limits") as exc:
        driver.create("/q", Limits(pids_max=4))
    assert exc.value.cgroup == "/q"
    shutil.rmtree(cg_root / "q")


def test_kill_all_writes_cgroup_kill_where_the_kernel_has_it(tmp_path: Path) -> None:
    from remedy.actions.cgroups import CgroupV2Driver  # noqa: PLC0415
    from remedy.proc import ProcFS  # noqa: PLC0415

    group = tmp_path / "cg" / "a"
    group.mkdir(parents=True)
    (tmp_path / "cg" / "cgroup.controllers").write_text("cpu pids\n")
    driver = CgroupV2Driver(tmp_path / "cg", ProcFS(tmp_path / "proc"))
    assert driver.kill_all("/a") is False  # no cgroup.kill: a kernel before 5.14
    (group / "cgroup.kill").write_text("")
    assert driver.kill_all("/a") is True
    assert (group / "cgroup.kill").read_text() == "1"


def _limits_file(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text + "\n")


def test_inherited_takes_the_tightest_along_the_path(driver: CgroupV2Driver, cg_root: Path) -> None:
    _limits_file(
        cg_root / "user.slice",
        pids_max="100",
        cpu_max="max 100000",
        memory_max=str(1 << 30),
        memory_current=str(900 << 20),
        memory_high="max",
    )
    _limits_file(
        cg_root / "user.slice" / "app",
        pids_max="max",
        cpu_max="25000 100000",
        memory_max=str(512 << 20),
        memory_current=str(100 << 20),
        cgroup_freeze="0",
    )
    got = driver.inherited({"": "/user.slice/app"})
    # Memory: the room left at each level (its pages stay charged there): 124 MiB at the slice.
    assert got == Limits(pids_max=100, cpu_cores=0.25, memory_max=124 << 20)
    (cg_root / "user.slice" / "cgroup.freeze").write_text("1\n")
    assert driver.inherited({"": "/user.slice/app"}).frozen is True
    assert driver.inherited({}) == Limits()


def test_tightened_never_loosens_and_weights_are_not_caps() -> None:
    step = Limits(pids_max=32, cpu_cores=0.2, memory_high=2 << 30, io_weight=500)
    under = Limits(pids_max=5, cpu_cores=1.0, memory_max=64 << 20, frozen=True, io_weight=50)
    assert step.tightened(under) == Limits(
        pids_max=5,
        cpu_cores=0.2,
        memory_high=2 << 30,
        memory_max=64 << 20,
        frozen=True,
        io_weight=500,
    )
    assert Limits(frozen=False).tightened(Limits()) == Limits(frozen=False)


def test_restore_refuses_to_call_done_while_it_is_still_there(
    driver: CgroupV2Driver, cg_root: Path, procfs: ProcFS
) -> None:
    (cg_root / "user.slice" / "app").mkdir(parents=True)
    (cg_root / "user.slice" / "app" / "cgroup.procs").write_text("")
    # /proc still says quarantine after the write (a fixture cannot move it): not restored.
    assert procfs.cgroups(CHILD_PID)[""] == "/user.slice/app"
    driver.restore(CHILD_PID, "/remedy/q-1-2", {"": "/user.slice/app"})  # not in it: no-op
    (procfs.root / str(CHILD_PID) / "cgroup").write_text("0::/remedy/q-1-2\n")
    with pytest.raises(CgroupError, match="still in the quarantine"):
        driver.restore(CHILD_PID, "/remedy/q-1-2", {"": "/user.slice/app"})
    assert (cg_root / "user.slice" / "app" / "cgroup.procs").read_text() == str(CHILD_PID)


@pytest.mark.parametrize("pid", [0, -1])
def test_a_move_of_no_process_is_refused(driver: CgroupV2Driver, cg_root: Path, pid: int) -> None:
    """cgroup.procs reads "0" as "the writing process": a cgroup offender's pid 0 reaching a
    move would put the agent itself into the quarantine."""
    (cg_root / "q").mkdir()
    (cg_root / "q" / "cgroup.procs").write_text("")
    with pytest.raises(CgroupError, match="not a process"):
        driver.move(pid, "/q")
    assert (cg_root / "q" / "cgroup.procs").read_text() == ""


def test_inherited_room_leaves_out_page_cache(driver: CgroupV2Driver, cg_root: Path) -> None:
    """A memory limit full of page cache is not full: the kernel reclaims file pages before it
    OOM-kills anything, so counting them as used would make a quarantine an OOM kill."""
    _limits_file(
        cg_root / "app", memory_max=str(64 << 20), memory_current=str(63 << 20), memory_high="max"
    )
    (cg_root / "app" / "memory.stat").write_text(
        f"anon {8 << 20}\nfile {55 << 20}\nactive_file {20 << 20}\ninactive_file {35 << 20}\n"
    )
    assert driver.inherited({"": "/app"}).memory_max == 56 << 20  # 64 - (63 - 55)
    assert driver.inherited({"": "/app"}, ("pids_max",)).memory_max is None  # not carried


def test_a_v2_move_carries_every_limit_a_v1_one_only_its_hierarchies() -> None:
    assert CgroupV2Driver(Path("/x"), ProcFS()).carried(Limits(cpu_cores=0.5)) == INHERITED
    v1 = CgroupV1Driver(Path("/x"), ProcFS())
    assert v1.carried(Limits(cpu_cores=0.5)) == ("pids_max", "cpu_cores")
    assert set(v1.carried(Limits(memory_max=1 << 20))) == {
        "pids_max", "cpu_cores", "memory_max", "memory_high"
    }  # fmt: skip


def test_a_containing_move_that_would_be_an_oom_kill_is_refused(
    driver: CgroupV2Driver, cg_root: Path
) -> None:
    """v2 moves memory with the process: out of a cgroup with 8 MiB of anonymous room left, a
    quarantine (a step that never ends a process) would be an OOM kill; limit_memory, which
    says it can end one, is not refused by this rule."""
    from remedy.actions.throttle import MEMORY_ROOM_FLOOR, _refuse_an_oom_kill  # noqa: PLC0415

    tight = Limits(memory_max=8 << 20)
    with pytest.raises(CgroupError, match="OOM kill"):
        _refuse_an_oom_kill(42, tight, Limits(pids_max=32, cpu_cores=0.2), "/q")
    _refuse_an_oom_kill(42, tight, Limits(memory_max=1 << 30), "/q")  # limit_memory: allowed
    _refuse_an_oom_kill(42, Limits(memory_max=MEMORY_ROOM_FLOOR), Limits(pids_max=32), "/q")
