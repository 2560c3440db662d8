"""Read-only views of /proc: one process's identity, its ancestry and its cgroups.

The root is a setting so tests can point it at a fixture tree. Every read of one process goes
through a directory fd on ``/proc/<pid>``: the kernel ties that directory to the task it was
opened for (``proc_pid_lookup`` pins the ``struct pid``), so files opened relative to it can
never describe a different process that reused the pid in between; they fail with ESRCH/ENOENT
instead.

Files are parsed the way the kernel writes them, never with ``str.splitlines()`` (which also
breaks lines at \x1c, \x1d, \x1e, \x85, \u2028 ..., bytes any user can put in a comm or a
cgroup name): see :func:`parse_cgroup_file` and SECURITY.md, "Reading /proc".
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from remedy.errors import ActionError, PermissionDenied, ProcessGone

__all__ = [
    "LOADER_ENV",
    "PF_KTHREAD",
    "ProcFS",
    "ProcessInfo",
    "Provenance",
    "learn_layout",
    "parse_cgroup_file",
]

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

# Environment variables that make the dynamic loader (or libc, GCONV_PATH) load code from a
# path the variable names: with one set, the code running is not only the executable's. glibc
# strips them for setuid programs for the same reason (elf/dl-support.c, unsecure_envvars).
LOADER_ENV = frozenset({"LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "GCONV_PATH"})
# /proc/<pid>/loginuid of a process no login session started: (uid_t)-1 (kernel/audit.c).
_NO_LOGINUID = 2**32 - 1

# A line of /proc/<pid>/cgroup is "<hierarchy id>:<controllers>:<path>\n" and the path always
# starts with "/" ("/.." under a cgroup namespace too): kernel/cgroup/cgroup.c,
# proc_cgroup_show(). The path is written with seq_puts, unescaped: it may hold "\n" (cgroup
# names may not since Linux 4.13, cgroup_mkdir() and cgroup1_rename(); older kernels allow it).
_CGROUP_HEADER = re.compile(r"(\d+):([^:\n]*):/")
# proc_cgroup_show() appends this to the v2 path of a dead cgroup (a zombie's); a live cgroup
# may have a name ending so too, so a path ending in it has both readings.
_DELETED = " (deleted)"
# A hierarchy with more possible readings than this is refused rather than searched: only a
# process that planted hundreds of fake lines in its own cgroup names gets there.
_MAX_READINGS = 64


def learn_layout(text: str) -> tuple[str, ...] | None:
    """The hierarchy headers of a /proc/<pid>/cgroup ("9:name=systemd:", ..., "0::"), in order.

    Every process's file has the same lines in the same order (proc_cgroup_show() walks the
    one global list of hierarchies); only the paths differ. Learn them from a file whose paths
    an unprivileged user cannot choose (the reader's own, /proc/self/cgroup) and they tell
    where every other file's lines start. None unless ``text`` has the plain shape: one header
    per line, hierarchy ids strictly decreasing (the list is newest first, and ids are
    allocated cyclically, so they only grow; cgroup2 is 0 and last).
    """
    if not text.endswith("\n"):
        return None
    headers: list[str] = []
    last: int | None = None
    for line in text[:-1].split("\n"):
        match = _CGROUP_HEADER.match(line)
        if match is None:
            return None
        hierarchy = int(match[1])
        if last is not None and hierarchy >= last:
            return None
        last = hierarchy
        headers.append(f"{match[1]}:{match[2]}:")
    return tuple(headers) or None


def parse_cgroup_file(text: str, layout: Sequence[str]) -> dict[str, tuple[str, ...]] | None:
    """Every reading of a /proc/<pid>/cgroup consistent with ``layout``, per hierarchy key.

    Keys are controller names ("pids", "cpu" and "cpuacct" for "cpu,cpuacct"), "name=X" for
    named v1 hierarchies and "" for cgroup2. A cgroup name may hold "\n" followed by text
    shaped like another line, so a line starts only where a header of ``layout`` follows a
    "\n", in ``layout``'s order, and where several places could start a line, each is kept
    as a reading: the caller tells them apart by membership (a process is in exactly one
    cgroup per hierarchy), or refuses. An honest name with "\n" in it that does not fake the
    next header has exactly one reading. An empty tuple means too many readings to list.
    None: ``text`` does not have ``layout``'s lines (a hierarchy was mounted since).
    """
    if not text.endswith("\n") or not layout:
        return None
    frags = text[:-1].split("\n")
    count = len(layout)
    starts = [[i for i, f in enumerate(frags) if f.startswith(h + "/")] for h in layout]
    # forward[k]: where line k can start with lines 0..k-1 before it; backward[k]: where it
    # can start with lines k+1.. after it. Both hold for the starts of a complete reading.
    forward: list[list[int]] = [[0] if starts[0][:1] == [0] else []]
    for k in range(1, count):
        prev = forward[k - 1]
        forward.append([a for a in starts[k] if prev and a > prev[0]])
    backward: list[list[int]] = [starts[-1]]
    for k in range(count - 2, -1, -1):
        nxt = backward[0]
        backward.insert(0, [a for a in starts[k] if nxt and a < nxt[-1]])
    feasible = [sorted(set(f) & set(b)) for f, b in zip(forward, backward, strict=True)]
    if not all(feasible):
        return None
    readings: dict[str, tuple[str, ...]] = {}
    for k, header in enumerate(layout):
        ends = feasible[k + 1] if k + 1 < count else [len(frags)]
        paths: tuple[str, ...] = ()
        if len(feasible[k]) * len(ends) <= _MAX_READINGS:
            found = {
                "\n".join(frags[a:b])[len(header) :] for a in feasible[k] for b in ends if a < b
            }
            if header.endswith("::"):
                found |= {p[: -len(_DELETED)] for p in found if p.endswith(_DELETED)}
            paths = tuple(sorted(found))
        controllers = header.split(":", 2)[1]
        for key in controllers.split(",") if controllers else [""]:
            readings[key] = paths
    return readings


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


@dataclass(frozen=True)
class Provenance:
    """Who one process runs as and how it started: facts an unprivileged user cannot choose for
    a process of another uid, read when a protection decision needs them (see
    :meth:`ProcFS.provenance`)."""

    uids: tuple[int, int, int, int]  # real, effective, saved, filesystem (the Uid line)
    # The audit login uid (pam_loginuid sets it at login, every child inherits it, and only
    # CAP_AUDIT_CONTROL may set it, once): whose login session started the process. None when
    # no session did (unset, or a kernel without CONFIG_AUDITSYSCALL).
    loginuid: int | None
    loader_env: tuple[str, ...]  # the LOADER_ENV names set in its environment, sorted
    # Owner and mode of the file it runs, through the exe link (which reaches the file even
    # after it was unlinked).
    exe_uid: int
    exe_mode: int


class ProcFS:
    """Parses /proc (or a fixture tree shaped like it) into :class:`ProcessInfo` records."""

    def __init__(self, root: Path = Path("/proc"), cgroup_layout: Sequence[str] = ()) -> None:
        """``cgroup_layout``: the hierarchy headers (:func:`learn_layout`); by default learnt
        from ``root/self/cgroup`` and learnt again when a file no longer fits."""
        self.root = root
        self._layout_fixed = bool(cgroup_layout)
        self._layout: tuple[str, ...] | None = tuple(cgroup_layout) or None

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

    def provenance(self, pid: int, start_ticks: int) -> Provenance:
        """The :class:`Provenance` of the process ``(pid, start_ticks)``.

        Read through one directory fd whose stat must show ``start_ticks``: a process that took
        the pid since is never described (:class:`ProcessGone`). Raises
        :class:`PermissionDenied` when environ is unreadable (it takes the same ptrace check as
        the exe link) and :class:`ActionError` for a malformed file.
        """
        try:
            dfd = os.open(self.root / str(pid), os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise _translate(err, pid, "cannot open /proc entry") from err
        try:
            stat = _read_text(dfd, "stat", pid)
            status = _read_text(dfd, "status", pid)
            loginuid = _loginuid(dfd, pid)
            try:
                environ = _read_bytes(dfd, "environ")
                exe = os.stat("exe", dir_fd=dfd)
            except OSError as err:
                raise _translate(err, pid, "cannot read environ or exe") from err
        finally:
            os.close(dfd)
        if int(_split_stat(stat, pid)[1][_STARTTIME]) != start_ticks:
            raise ProcessGone("the pid belongs to another process now", pid=pid)
        # environ is the block the process was exec'd with, NUL-separated "NAME=value" (the
        # process may rewrite it since; see SECURITY.md for what that leaves).
        names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0")}
        loader_env = tuple(sorted(n for n in LOADER_ENV if n.encode() in names))
        return Provenance(_uids(status, pid), loginuid, loader_env, exe.st_uid, exe.st_mode)

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

    def cgroup_readings(self, pid: int) -> dict[str, tuple[str, ...]]:
        """/proc/pid/cgroup as {hierarchy key: every reading of its path} (see
        :func:`parse_cgroup_file`); honest files have one reading per key.

        Raises :class:`ProcessGone` for a gone process and :class:`ActionError` for a file
        that fits no known layout.
        """
        try:
            fd = os.open(self.root / str(pid) / "cgroup", os.O_RDONLY)
            try:
                data = _read_fd(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise _translate(err, pid, "cannot read cgroup") from err
        # Cgroup names are any bytes but "/" and NUL; surrogateescape keeps them intact.
        text = data.decode("utf-8", errors="surrogateescape")
        layout = self._cgroup_layout()
        parsed = parse_cgroup_file(text, layout) if layout else None
        if parsed is None and not self._layout_fixed:
            # A v1 hierarchy mounted or unmounted since we learnt the layout.
            self._layout = None
            fresh = self._cgroup_layout()
            if fresh is None:
                # No /proc/self (a fixture tree): only a file of the plain shape is read.
                fresh = learn_layout(text)
            if fresh is not None and fresh != layout:
                parsed = parse_cgroup_file(text, fresh)
        if parsed is None:
            raise ActionError("/proc/pid/cgroup does not have this host's hierarchies", pid=pid)
        return parsed

    def cgroup(
        self, pid: int, key: str, is_member: Callable[[str], bool] | None = None
    ) -> str | None:
        """The path of ``pid``'s cgroup in hierarchy ``key`` ("" for cgroup2, "pids", ...), or
        None when /proc/pid/cgroup has no such hierarchy.

        Where the file can be read more than one way (a cgroup name faking a line),
        ``is_member(path)`` says which reading holds the process; without it, or when not
        exactly one does, raises :class:`ActionError`: never a guess.
        """
        readings = self.cgroup_readings(pid).get(key)
        if readings is None:
            return None
        if len(readings) == 1:
            return readings[0]
        if is_member is not None and readings:
            members = [path for path in readings if is_member(path)]
            if len(members) == 1:
                return members[0]
        what = f"the {key} hierarchy" if key else "cgroup v2"
        raise ActionError(
            f"/proc/pid/cgroup has {len(readings) or 'too many'} readings for {what} "
            "and none proven",
            pid=pid,
        )

    def cgroups(self, pid: int) -> dict[str, str]:
        """/proc/pid/cgroup as {controller: path}; the v2 line's key is ``""``.

        A v1 line naming several controllers ("3:cpu,cpuacct:/x") yields one key per controller;
        named hierarchies keep their name ("name=systemd"). Raises :class:`ActionError` if any
        hierarchy has more than one reading: use :meth:`cgroup` with a membership check then.
        """
        readings = self.cgroup_readings(pid)
        if any(len(paths) != 1 for paths in readings.values()):
            raise ActionError("/proc/pid/cgroup has ambiguous cgroup paths", pid=pid)
        return {key: paths[0] for key, paths in readings.items()}

    def cgroup2_inode(self, pid: int, mount: Path) -> int:
        """The inode of ``pid``'s cgroup2 directory under ``mount``: what
        ``bpf_get_current_cgroup_id()`` returned for it (both are the kernfs node id), so a
        record's cgroup id can be checked against the cgroup the path resolves to now.

        Raises :class:`ActionError` (naming the pid) when the path cannot be resolved: no v2
        line, ambiguous, or outside this reader's cgroup namespace ("/.."); ProcessGone.
        """
        path = self.cgroup(pid, "", is_member=lambda p: _is_member(mount, p, pid))
        if path is None:
            raise ActionError("no cgroup v2 line in /proc/pid/cgroup", pid=pid)
        directory = _cgroup_dir(mount, path, pid)
        try:
            return os.stat(directory).st_ino
        except OSError as err:
            raise ActionError(f"cannot stat {directory}: {err.strerror}", pid=pid) from err

    def _cgroup_layout(self) -> tuple[str, ...] | None:
        if self._layout is None:
            try:
                fd = os.open(self.root / "self" / "cgroup", os.O_RDONLY)
                try:
                    own = _read_fd(fd).decode("utf-8", errors="surrogateescape")
                finally:
                    os.close(fd)
            except OSError:
                return None
            self._layout = learn_layout(own)
        return self._layout

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


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_bytes(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _cgroup_dir(mount: Path, path: str, pid: int) -> Path:
    """``mount``/``path``, refusing anything that could leave the mount."""
    parts = path.split("/")[1:] if path != "/" else []
    if not path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        # "/.." is how the kernel names a cgroup above the reader's cgroup namespace root.
        raise ActionError(f"cgroup path {path!r} is outside this reader's view", pid=pid)
    return mount.joinpath(*parts)


def _is_member(mount: Path, path: str, pid: int) -> bool:
    try:
        procs = _cgroup_dir(mount, path, pid) / "cgroup.procs"
        return str(pid) in procs.read_text().split()
    except (ActionError, OSError):
        return False


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
    return _uids(status, pid)[0]


def _uids(status: str, pid: int) -> tuple[int, int, int, int]:
    # Lines end at "\n" only: the first line is "Name:\t<comm>", and comm is any 15 bytes but
    # "\n" and "\\", which the kernel escapes (proc_task_name(); \t and \x1c pass raw). A
    # comm of "\x1cUid:\t0\t0\t0" must not read as a Uid line (psutil's uids() regex does).
    for line in status.split("\n")[1:]:
        if line.startswith("Uid:\t"):
            # "Uid:\treal\teffective\tsaved\tfs"
            fields = line.split("\t")[1:]
            if len(fields) != 4 or not all(f.isdigit() for f in fields):
                raise ActionError("malformed Uid line in /proc/pid/status", pid=pid)
            real, effective, saved, fs = (int(f) for f in fields)
            return real, effective, saved, fs
    raise ActionError("no Uid line in /proc/pid/status", pid=pid)


def _loginuid(dfd: int, pid: int) -> int | None:
    try:
        text = _read_bytes(dfd, "loginuid").decode("ascii")
    except FileNotFoundError:
        # A kernel without CONFIG_AUDITSYSCALL has no login uids at all. (ENOENT also means the
        # task exited; then the environ read that follows fails with ProcessGone.)
        return None
    except OSError as err:
        raise _translate(err, pid, "cannot read loginuid") from err
    try:
        value = int(text)
    except ValueError as err:
        raise ActionError(f"malformed loginuid {text!r}", pid=pid) from err
    return None if value == _NO_LOGINUID else value
