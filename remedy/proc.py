"""Read-only views of /proc: one process's identity, its ancestry and its cgroups.

The root is a setting so tests can point it at a fixture tree. Every read of one process goes
through a directory fd on ``/proc/<pid>``: the kernel ties that directory to the task it was
opened for (``proc_pid_lookup`` pins the ``struct pid``), so files opened relative to it can
never describe a different process that reused the pid in between; they fail with ESRCH/ENOENT
instead.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from remedy.errors import ActionError, PermissionDenied, ProcessGone

__all__ = ["PF_KTHREAD", "ProcFS", "ProcessInfo"]

# include/linux/sched.h: set on every kernel thread (kthreadd and its children).
PF_KTHREAD = 0x00200000
# kthreadd is always pid 2 in the initial pid namespace; every kernel thread is its child.
_KTHREADD_PID = 2

# The errnos that mean "this pid's process is gone": ENOENT when the /proc/<pid> directory is no
# longer there, ESRCH when reading a file whose task exited after we opened the directory.
_GONE = (errno.ENOENT, errno.ESRCH)

# /proc/<pid>/stat fields after the "(comm)" field, 0-based (proc(5) numbers them from 1):
# 3 state, 4 ppid, 9 flags, 22 starttime.
_STATE, _PPID, _FLAGS, _STARTTIME = 0, 1, 6, 19


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc said about one process at one moment. (pid, start_ticks) is its identity."""

    pid: int
    ppid: int
    comm: str
    state: str
    start_ticks: int
    flags: int
    uid: int
    exe: str | None  # readlink /proc/pid/exe; None if unreadable (kernel threads, gone, EACCES)
    cmdline: tuple[str, ...]

    @property
    def is_kernel_thread(self) -> bool:
        """True for kernel threads: PF_KTHREAD, or kthreadd (pid 2) and its children."""
        return bool(self.flags & PF_KTHREAD) or _KTHREADD_PID in (self.pid, self.ppid)


class ProcFS:
    """Parses /proc (or a fixture tree shaped like it) into :class:`ProcessInfo` records."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root

    def read(self, pid: int) -> ProcessInfo:
        """Read one process. Raises :class:`ProcessGone` if it does not exist (any more)."""
        try:
            dfd = os.open(self.root / str(pid), os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise _translate(err, pid, "cannot open /proc entry") from err
        try:
            stat = _read_text(dfd, "stat", pid)
            status = _read_text(dfd, "status", pid)
            exe = _readlink_or_none(dfd, "exe")
            cmdline = _cmdline_or_empty(dfd)
        finally:
            os.close(dfd)
        comm, fields = _split_stat(stat, pid)
        return ProcessInfo(
            pid=pid,
            ppid=int(fields[_PPID]),
            comm=comm,
            state=fields[_STATE],
            start_ticks=int(fields[_STARTTIME]),
            flags=int(fields[_FLAGS]),
            uid=_real_uid(status, pid),
            exe=exe,
            cmdline=cmdline,
        )

    def ancestors(self, pid: int) -> list[ProcessInfo]:
        """The parent chain of ``pid``, parent first, up to and including pid 1.

        Stops quietly at the first ancestor that is gone (its children were reparented while
        we walked). ``pid`` itself missing raises :class:`ProcessGone`.
        """
        chain: list[ProcessInfo] = []
        seen = {pid}
        ppid = self.read(pid).ppid
        # ppid 0 is the kernel's "no parent" (pid 1, kthreadd, or a parent outside our pid ns).
        while ppid > 0 and ppid not in seen:
            seen.add(ppid)
            try:
                info = self.read(ppid)
            except ProcessGone:
                break
            chain.append(info)
            ppid = info.ppid
        return chain

    @cached_property
    def _clock_ticks(self) -> int:
        return os.sysconf("SC_CLK_TCK")

    def clock_ticks(self) -> int:
        """USER_HZ: the unit of ``starttime`` in /proc/pid/stat (almost always 100)."""
        return self._clock_ticks

    def start_boot_ns(self, info: ProcessInfo) -> int:
        """``info.start_ticks`` as nanoseconds since boot (CLOCK_BOOTTIME).

        The kernel reports ``task->start_boottime`` truncated to clock ticks
        (``nsec_to_clock_t`` in fs/proc/array.c), so the result is at most one tick (10 ms at
        USER_HZ=100) earlier than the real start, never later.
        """
        return info.start_ticks * 1_000_000_000 // self.clock_ticks()

    def cgroups(self, pid: int) -> dict[str, str]:
        """/proc/pid/cgroup as {controller: path}; the v2 line's key is ``""``.

        A v1 line naming several controllers ("3:cpu,cpuacct:/x") yields one key per controller;
        named hierarchies keep their name ("name=systemd").
        """
        path = self.root / str(pid) / "cgroup"
        try:
            text = path.read_text()
        except OSError as err:
            raise _translate(err, pid, "cannot read cgroup") from err
        result: dict[str, str] = {}
        for line in text.splitlines():
            # "hierarchy-ID:controller-list:cgroup-path"; the path itself may contain ':'.
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, cgpath = parts
            if not controllers:
                result[""] = cgpath
                continue
            for controller in controllers.split(","):
                result[controller] = cgpath
        return result

    def pids(self) -> list[int]:
        """Every pid currently listed under the root (numeric entries only), ascending."""
        try:
            names = os.listdir(self.root)
        except OSError as err:
            raise ActionError(f"cannot list {self.root}: {err.strerror}") from err
        return sorted(int(n) for n in names if n.isdigit())


def _translate(err: OSError, pid: int, what: str) -> ActionError:
    if err.errno in _GONE:
        return ProcessGone(f"{what}: process gone", pid=pid)
    if err.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{what}: {err.strerror}", pid=pid)
    return ActionError(f"{what}: {err.strerror}", pid=pid)


def _read_bytes(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
    try:
        chunks: list[bytes] = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_text(dfd: int, name: str, pid: int) -> str:
    try:
        data = _read_bytes(dfd, name)
    except OSError as err:
        raise _translate(err, pid, f"cannot read {name}") from err
    # comm is whatever bytes the process chose (prctl PR_SET_NAME); never fail on them.
    return data.decode("utf-8", errors="surrogateescape")


def _readlink_or_none(dfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        # ENOENT for kernel threads and exited tasks, EACCES for others' processes without
        # CAP_SYS_PTRACE: the exe is optional context, not identity.
        return None


def _cmdline_or_empty(dfd: int) -> tuple[str, ...]:
    try:
        data = _read_bytes(dfd, "cmdline")
    except OSError:
        return ()
    args = data.decode("utf-8", errors="surrogateescape").split("\0")
    if args and args[-1] == "":
        args.pop()
    return tuple(args)


def _split_stat(stat: str, pid: int) -> tuple[str, list[str]]:
    # comm may contain anything, including ") (" and spaces, but the kernel always closes it
    # with the last ')' on the line (fs/proc/array.c: do_task_stat), so split there.
    open_paren = stat.find("(")
    close_paren = stat.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ActionError("malformed /proc/pid/stat", pid=pid)
    fields = stat[close_paren + 1 :].split()
    if len(fields) <= _STARTTIME:
        raise ActionError("truncated /proc/pid/stat", pid=pid)
    return stat[open_paren + 1 : close_paren], fields


def _real_uid(status: str, pid: int) -> int:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            # "Uid:\treal\teffective\tsaved\tfs"
            return int(line.split()[1])
    raise ActionError("no Uid line in /proc/pid/status", pid=pid)
