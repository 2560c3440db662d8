"""ProcFS against a fixture /proc tree: stat parsing, ancestry, cgroups, gone processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remedy.errors import ActionError, ProcessGone
from remedy.proc import PF_KTHREAD, ProcessInfo, ProcFS, learn_layout, parse_cgroup_file

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
    # stat carries comm raw; status escapes only "\\" and "\n" in it (proc_task_name()).
    (d / "stat").write_bytes(_raw(f"{pid} ({comm}) {' '.join(after)}\n"))
    name = comm.replace("\\", "\\\\").replace("\n", "\\n")
    (d / "status").write_bytes(
        _raw(
            f"Name:\t{name}\nUmask:\t0022\nState:\t{state}\nPPid:\t{ppid}\n"
            f"Uid:\t{uid}\t{uid + 1}\t{uid + 2}\t{uid + 3}\nGid:\t0\t0\t0\t0\n"
        )
    )
    (d / "cmdline").write_bytes(b"".join(_raw(a) + b"\0" for a in cmdline))
    (d / "cgroup").write_bytes(_raw(cgroup))
    if exe is not None:
        (d / "exe").symlink_to(exe)


def _raw(text: str) -> bytes:
    """``text`` as the kernel's bytes; lone surrogates stand for non-UTF-8 bytes."""
    return text.encode("utf-8", errors="surrogateescape")


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


# --- hostile bytes: what a process chooses (its comm, argv, cgroup names) ---------------------

# Every character str.splitlines() breaks at besides "\n": an unprivileged user can put any of
# them in a comm (prctl PR_SET_NAME) or a cgroup name (mkdir in a delegated subtree).
SPLITLINES_BREAKS = ("\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
# /proc/self/cgroup of a hybrid host like this one: the hierarchies every file has, in order.
LAYOUT_FILE = "9:name=systemd:/\n8:pids:/\n4:memory:/\n1:cpu,cpuacct:/\n0::/\n"


def hybrid(root: Path, pid: int, pids: str, v2: str) -> None:
    """A process on the hybrid layout with the given pids and v2 paths."""
    cgroup = f"9:name=systemd:/\n8:pids:{pids}\n4:memory:/\n1:cpu,cpuacct:/\n0::{v2}\n"
    write_proc(root, pid, ppid=1, cgroup=cgroup)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A fixture /proc whose reader (self) is on the hybrid layout."""
    root = tmp_path / "hostproc"
    root.mkdir()
    write_proc(root, 10, ppid=1, comm="remedy", uid=0, cgroup=LAYOUT_FILE)
    (root / "self").symlink_to("10")
    return root


@pytest.mark.parametrize("brk", SPLITLINES_BREAKS)
def test_a_comm_cannot_forge_the_uid_line(proc_root: Path, brk: str) -> None:
    # A 15-byte comm; the Name line comes first in status, so a reader that also breaks lines
    # at brk sees "Uid:\t0..." before the real one (psutil's uids() regex does, even without).
    write_proc(proc_root, 300, ppid=1, comm=f"{brk}Uid:\t0\t0\t0", uid=65534)
    info = ProcFS(proc_root).read(300)
    assert info.uid == 65534
    assert info.comm == f"{brk}Uid:\t0\t0\t0"


def test_a_comm_starting_like_the_uid_line_is_not_it(proc_root: Path) -> None:
    write_proc(proc_root, 300, ppid=1, comm="Uid:\t0\t0\t0", uid=65534)
    assert ProcFS(proc_root).read(300).uid == 65534


@pytest.mark.parametrize(
    "comm",
    [
        "a)\n(b) S 1 2",  # ")" and "\n": stat keeps them raw, status escapes the "\n"
        "\\n) R 0 0",  # a literal backslash-n, which status escapes as "\\\\n"
        ") ) )",
        "  spaced  ",
        "\udcff\udcfe)\x1c",  # non-UTF-8 bytes 0xff 0xfe
        "\u2028x\x85",
    ],
)
def test_comm_round_trips_any_byte(proc_root: Path, comm: str) -> None:
    write_proc(proc_root, 300, ppid=100, comm=comm, start_ticks=77, uid=4321)
    info = ProcFS(proc_root).read(300)
    assert (info.comm, info.ppid, info.start_ticks, info.uid) == (comm, 100, 77, 4321)
    assert _raw(info.comm) == _raw(comm)  # the bytes survive, not only the text


def test_cmdline_round_trips_any_byte(proc_root: Path) -> None:
    argv = ("./x\n", "a\x1cb", "\udcff", ") (", "")
    write_proc(proc_root, 300, ppid=1, cmdline=argv)
    assert ProcFS(proc_root).read(300).cmdline == argv


@pytest.mark.parametrize("brk", SPLITLINES_BREAKS)
def test_a_cgroup_name_cannot_forge_the_v2_line(host: Path, brk: str) -> None:
    name = f"/deleg/x{brk}0::/system.slice/victim.service"
    hybrid(host, 300, pids="/user.slice", v2=name)
    assert ProcFS(host).cgroups(300)[""] == name
    assert ProcFS(host).cgroup(300, "") == name


@pytest.mark.parametrize("brk", SPLITLINES_BREAKS)
def test_a_v2_cgroup_name_cannot_forge_a_v1_line(host: Path, brk: str) -> None:
    hybrid(host, 300, pids="/user.slice", v2=f"/deleg/x{brk}8:pids:/system.slice/victim.service")
    assert ProcFS(host).cgroups(300)["pids"] == "/user.slice"


def test_a_newline_faking_an_earlier_hierarchy_is_part_of_the_path(host: Path) -> None:
    # The kernel does not escape cgroup paths (seq_puts): "\n8:pids:/..." after the last line
    # is text of the v2 path, because pids comes before v2 on every process's file.
    v2 = "/deleg/x\n8:pids:/system.slice/victim.service"
    hybrid(host, 300, pids="/user.slice", v2=v2)
    assert ProcFS(host).cgroups(300) == {
        "name=systemd": "/",
        "pids": "/user.slice",
        "memory": "/",
        "cpu": "/",
        "cpuacct": "/",
        "": v2,
    }


def test_an_honest_newline_in_a_cgroup_name_reads_whole(host: Path) -> None:
    hybrid(host, 300, pids="/a\nb", v2="/c\nd\n")
    cgroups = ProcFS(host).cgroups(300)
    assert (cgroups["pids"], cgroups[""]) == ("/a\nb", "/c\nd\n")


def test_a_newline_faking_the_next_line_is_never_guessed(host: Path) -> None:
    # Both readings fit the kernel's format: only membership can tell them apart.
    v2 = "/deleg/x\n0::/system.slice/victim.service"
    hybrid(host, 300, pids="/user.slice", v2=v2)
    procfs = ProcFS(host)
    with pytest.raises(ActionError) as exc:
        procfs.cgroups(300)
    assert exc.value.pid == 300
    with pytest.raises(ActionError) as exc:
        procfs.cgroup(300, "")
    assert exc.value.pid == 300
    assert procfs.cgroup_readings(300)[""] == (v2, "/system.slice/victim.service")
    assert procfs.cgroup(300, "", is_member=lambda p: p == v2) == v2
    # The fake v2 line makes the cpu line ambiguous too; membership settles it the same way.
    assert procfs.cgroup(300, "cpu", is_member=lambda p: p == "/") == "/"
    with pytest.raises(ActionError):
        procfs.cgroup(300, "", is_member=lambda _p: True)  # both "members": still no guess


def test_a_v1_name_faking_the_next_hierarchy_is_resolved_by_membership(host: Path) -> None:
    name = "/deleg/x\n8:pids:/system.slice/victim.service"
    rest = "8:pids:/user.slice\n4:memory:/\n1:cpu,cpuacct:/\n0::/\n"
    write_proc(host, 300, ppid=1, cgroup=f"9:name=systemd:{name}\n{rest}")
    procfs = ProcFS(host)
    assert "/system.slice/victim.service\n8:pids:/user.slice" in procfs.cgroup_readings(300)["pids"]
    members = {"/user.slice", name}
    assert procfs.cgroup(300, "pids", is_member=members.__contains__) == "/user.slice"
    assert procfs.cgroup(300, "name=systemd", is_member=members.__contains__) == name


def test_non_utf8_cgroup_names_survive(host: Path) -> None:
    hybrid(host, 300, pids="/\udcff\udcfe", v2="/ok")
    assert _raw(ProcFS(host).cgroups(300)["pids"]) == b"/\xff\xfe"


def test_a_dead_v2_cgroup_reads_both_ways(host: Path) -> None:
    hybrid(host, 300, pids="/", v2="/gone (deleted)")
    assert ProcFS(host).cgroup_readings(300)[""] == ("/gone", "/gone (deleted)")


def test_hundreds_of_fake_lines_are_refused_not_searched(host: Path) -> None:
    v2 = "/d/" + "\n0::/x" * 200
    hybrid(host, 300, pids="/", v2=v2)
    assert ProcFS(host).cgroup_readings(300)[""] == ()
    with pytest.raises(ActionError):
        ProcFS(host).cgroup(300, "", is_member=lambda p: p == v2)


def test_layout_is_learnt_again_when_a_hierarchy_appears(host: Path) -> None:
    procfs = ProcFS(host)
    hybrid(host, 300, pids="/a", v2="/b")
    assert procfs.cgroup(300, "pids") == "/a"
    # A new named v1 hierarchy mounted: every file, /proc/self/cgroup too, gains a line.
    (host / "10" / "cgroup").write_text("10:name=new:/\n" + LAYOUT_FILE)
    old = (host / "300" / "cgroup").read_text()
    write_proc(host, 301, ppid=1, cgroup="10:name=new:/n\n" + old)
    assert procfs.cgroup(301, "name=new") == "/n"
    assert procfs.cgroup(301, "pids") == "/a"


def test_a_file_that_fits_no_layout_is_refused(host: Path) -> None:
    write_proc(host, 300, ppid=1, cgroup="0::/only-v2\n")
    with pytest.raises(ActionError) as exc:
        ProcFS(host).cgroups(300)
    assert exc.value.pid == 300


def test_given_layout_is_used_as_is(tmp_path: Path) -> None:
    write_proc(tmp_path, 300, ppid=1, cgroup="0::/a\n0::/b\n")
    procfs = ProcFS(tmp_path, cgroup_layout=("0::",))
    assert procfs.cgroup(300, "") == "/a\n0::/b"


def test_without_self_only_plain_files_are_read(proc_root: Path) -> None:
    (proc_root / "self").unlink()
    procfs = ProcFS(proc_root)
    assert procfs.cgroups(200)["pids"] == "/a/b"  # every file is its own layout
    write_proc(proc_root, 300, ppid=1, cgroup="0::/deleg/x\n0::/system.slice/victim.service\n")
    with pytest.raises(ActionError):
        procfs.cgroups(300)


@pytest.mark.parametrize(
    ("text", "layout"),
    [
        (LAYOUT_FILE, ("9:name=systemd:", "8:pids:", "4:memory:", "1:cpu,cpuacct:", "0::")),
        ("0::/\n", ("0::",)),
        ("0::/a\n0::/b\n", None),  # one hierarchy twice
        ("1:cpu:/\n2:pids:/\n", None),  # not newest first
        ("0::/a", None),  # no final newline
        ("0::/a\nb\n", None),  # a line that is no line
        ("", None),
    ],
)
def test_learn_layout(text: str, layout: tuple[str, ...] | None) -> None:
    assert learn_layout(text) == layout


def test_parse_cgroup_file_needs_every_hierarchy_in_order() -> None:
    layout = ("8:pids:", "0::")
    assert parse_cgroup_file("0::/\n8:pids:/\n", layout) is None
    assert parse_cgroup_file("8:pids:/\n", layout) is None
    assert parse_cgroup_file("8:pids:/p\n0::/v\n", layout) == {"pids": ("/p",), "": ("/v",)}


# --- the record's cgroup id against the directory the v2 path resolves to -------------------

FAKE_V2 = "/deleg/x\n0::/system.slice/victim.service"


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    """A cgroup2 mount with the attacker's directory and the victim it names."""
    root = tmp_path / "unified"
    (root / "deleg" / "x\n0::" / "system.slice" / "victim.service").mkdir(parents=True)
    (root / "system.slice" / "victim.service").mkdir(parents=True)
    (root / "cgroup.procs").write_text("1\n")
    (root / "system.slice" / "victim.service" / "cgroup.procs").write_text("555\n")
    return root


def test_cgroup2_inode_is_the_inode_of_the_true_directory(host: Path, mount: Path) -> None:
    true = mount / "deleg" / "x\n0::" / "system.slice" / "victim.service"
    (true / "cgroup.procs").write_text("300\n")
    hybrid(host, 300, pids="/", v2=FAKE_V2)
    inode = ProcFS(host).cgroup2_inode(300, mount)
    assert inode == true.stat().st_ino
    assert inode != (mount / "system.slice" / "victim.service").stat().st_ino


def test_cgroup2_inode_of_the_root_and_unresolvable_paths(host: Path, mount: Path) -> None:
    hybrid(host, 1, pids="/", v2="/")
    assert ProcFS(host).cgroup2_inode(1, mount) == mount.stat().st_ino
    hybrid(host, 300, pids="/", v2="/../other")  # a reader in a private cgroup namespace
    with pytest.raises(ActionError) as exc:
        ProcFS(host).cgroup2_inode(300, mount)
    assert exc.value.pid == 300
    hybrid(host, 301, pids="/", v2="/nowhere")
    with pytest.raises(ActionError):
        ProcFS(host).cgroup2_inode(301, mount)  # no such directory


def test_cgroup2_inode_refuses_an_unproven_reading(host: Path, mount: Path) -> None:
    # Neither reading's cgroup.procs lists the pid: no inode is better than a wrong one.
    hybrid(host, 300, pids="/", v2=FAKE_V2)
    with pytest.raises(ActionError):
        ProcFS(host).cgroup2_inode(300, mount)
