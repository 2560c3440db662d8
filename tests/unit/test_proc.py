"""ProcFS against a fixture /proc tree: stat parsing, ancestry, cgroups, gone processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remedy.errors import ProcessGone
from remedy.proc import PF_KTHREAD, ProcessInfo, ProcFS

TRICKY_COMM = "evil) (x y"


def write_proc(
    root: Path,
    pid: int,
    *,
    ppid: int,
    comm: str = "sh",
    state: str = "S",
    flags: int = 0x400000,
    start_ticks: int = 1000,
    uid: int = 1000,
    exe: str | None = "/usr/bin/sh",
    cmdline: tuple[str, ...] = ("sh", "-c", "x"),
    cgroup: str = "0::/\n",
) -> None:
    """One /proc/<pid> directory shaped like the kernel's (fs/proc/array.c)."""
    d = root / str(pid)
    d.mkdir(parents=True)
    # Fields 3..22 of proc(5); 22 is starttime, the rest are filler with distinct values.
    after = [state, str(ppid), str(pid), str(pid), "0", "-1", str(flags)]
    after += [str(n) for n in range(10, 22)]  # minflt .. itrealvalue (fields 10-21)
    after += [str(start_ticks), "12345", "67"]
    (d / "stat").write_text(f"{pid} ({comm}) {' '.join(after)}\n")
    (d / "status").write_text(
        f"Name:\t{comm}\nState:\t{state}\nPPid:\t{ppid}\n"
        f"Uid:\t{uid}\t{uid + 1}\t{uid + 2}\t{uid + 3}\nGid:\t0\t0\t0\t0\n"
    )
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
    (d / "cgroup").write_text(cgroup)
    if exe is not None:
        (d / "exe").symlink_to(exe)


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    write_proc(root, 1, ppid=0, comm="init", uid=0, start_ticks=1)
    write_proc(root, 2, ppid=0, comm="kthreadd", uid=0, flags=PF_KTHREAD, exe=None, cmdline=())
    write_proc(root, 40, ppid=2, comm="kworker/0:1", uid=0, flags=PF_KTHREAD, exe=None)
    write_proc(root, 100, ppid=1, comm="bash", start_ticks=500)
    write_proc(
        root,
        200,
        ppid=100,
        comm=TRICKY_COMM,
        state="R",
        start_ticks=987654,
        uid=1234,
        exe="/tmp/evil (deleted)",
        cmdline=("./evil", "arg with space"),
        cgroup="9:name=systemd:/user.slice\n4:pids:/a/b\n3:cpu,cpuacct:/x:y\n0::/v2/grp\n",
    )
    (root / "self").symlink_to("200")
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    return root


def test_read_splits_stat_at_last_paren(proc_root: Path) -> None:
    info = ProcFS(proc_root).read(200)
    assert info == ProcessInfo(
        pid=200,
        ppid=100,
        comm=TRICKY_COMM,
        state="R",
        start_ticks=987654,
        flags=0x400000,
        uid=1234,
        exe="/tmp/evil (deleted)",
        cmdline=("./evil", "arg with space"),
    )
    assert not info.is_kernel_thread


def test_uid_is_the_real_uid(proc_root: Path) -> None:
    assert ProcFS(proc_root).read(200).uid == 1234


def test_missing_pid_raises_process_gone(proc_root: Path) -> None:
    with pytest.raises(ProcessGone) as exc:
        ProcFS(proc_root).read(31337)
    assert exc.value.pid == 31337


def test_kernel_threads(proc_root: Path) -> None:
    procfs = ProcFS(proc_root)
    kthreadd, kworker = procfs.read(2), procfs.read(40)
    assert kthreadd.is_kernel_thread and kworker.is_kernel_thread
    assert kthreadd.exe is None and kthreadd.cmdline == ()
    assert not procfs.read(1).is_kernel_thread


def test_kernel_thread_by_parent_alone() -> None:
    info = ProcessInfo(5, 2, "k", "S", 0, 0, 0, None, ())
    assert info.is_kernel_thread


def test_ancestors_parent_first_up_to_init(proc_root: Path) -> None:
    chain = ProcFS(proc_root).ancestors(200)
    assert [(p.pid, p.comm) for p in chain] == [(100, "bash"), (1, "init")]
    assert ProcFS(proc_root).ancestors(1) == []


def test_ancestors_stop_quietly_at_a_gone_parent(proc_root: Path) -> None:
    write_proc(proc_root, 300, ppid=299, comm="orphan")
    assert ProcFS(proc_root).ancestors(300) == []


def test_ancestors_of_a_gone_pid_raise(proc_root: Path) -> None:
    with pytest.raises(ProcessGone):
        ProcFS(proc_root).ancestors(31337)


def test_cgroups_v1_and_v2_lines(proc_root: Path) -> None:
    assert ProcFS(proc_root).cgroups(200) == {
        "name=systemd": "/user.slice",
        "pids": "/a/b",
        "cpu": "/x:y",
        "cpuacct": "/x:y",
        "": "/v2/grp",
    }


def test_cgroups_of_a_gone_pid_raise(proc_root: Path) -> None:
    with pytest.raises(ProcessGone):
        ProcFS(proc_root).cgroups(31337)


def test_pids_lists_numeric_entries_only(proc_root: Path) -> None:
    assert ProcFS(proc_root).pids() == [1, 2, 40, 100, 200]


def test_start_boot_ns_uses_clock_ticks(proc_root: Path) -> None:
    procfs = ProcFS(proc_root)
    hz = procfs.clock_ticks()
    assert hz == os.sysconf("SC_CLK_TCK")
    assert procfs.start_boot_ns(procfs.read(200)) == 987654 * 1_000_000_000 // hz


def test_reads_the_real_proc_for_this_process() -> None:
    procfs = ProcFS()
    me = procfs.read(os.getpid())
    assert me.ppid == os.getppid()
    assert me.uid == os.getuid()
    assert procfs.ancestors(os.getpid())[-1].pid == 1
