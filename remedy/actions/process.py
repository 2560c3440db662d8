"""A process pinned by a pidfd: the only way remedy signals anything.

A pid is a number the kernel recycles; a pidfd (``pidfd_open(2)``, Linux 5.3) refers to one
``struct pid``, i.e. one process. ``pidfd_send_signal(2)`` through it fails with ESRCH once that
process has been reaped, even if its number already belongs to someone else.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from remedy.errors import ActionError, IdentityUnverified, PermissionDenied, ProcessGone
from remedy.proc import ProcessInfo, ProcFS

__all__ = ["Birth", "BirthRegistry", "ProcessHandle", "signal_pinned"]

log = logging.getLogger(__name__)


class BirthRegistry(Protocol):
    """The kernel's record of births (the kernel sensor's ``births`` map)."""

    started_ns: int  # CLOCK_BOOTTIME from which every new process has an entry

    def birth(self, tgid: int) -> int | None:
        """The birth of the process holding ``tgid``, if it was forked since ``started_ns``."""
        ...


@dataclass(frozen=True)
class Birth:
    """The birth a record names a process by: CLOCK_BOOTTIME ns of task->start_boottime.

    ``exact``: the kernel read it at full resolution. Sampled records and journal entries only
    know clock ticks (``exact`` False), matched at that resolution.
    """

    ns: int
    exact: bool = True

    def mismatch(
        self, pid: int, info: ProcessInfo, procfs: ProcFS, registry: BirthRegistry | None
    ) -> str | None:
        """Why the process /proc describes as ``info`` is not the one born at ``ns``, or None.

        The rule (SECURITY.md, "Identity"): /proc's start time is the same nanosecond value
        truncated to clock ticks (fs/proc/array.c), so the ticks must be equal; and where the
        kernel recorded the birth at fork (every process forked since the sensor started), it
        must equal ``ns`` to the nanosecond. A process born after a record was made can never
        match that record. Without a kernel entry (born before the sensor started) the
        tolerance is one clock tick: the only processes it cannot tell apart are two holders of
        the same pid born in the same tick, both before the sensor started.
        """
        if self.ns <= 0:
            return "its birth is unknown (the kernel could not read it)"
        hz = procfs.clock_ticks()
        if info.start_ticks != self.ns * hz // 1_000_000_000:
            return "pid reused: its start time differs from the one recorded"
        if not self.exact or registry is None:
            return None
        kernel = registry.birth(pid)
        if kernel is not None:
            return None if kernel == self.ns else "pid reused: born at another nanosecond"
        if procfs.start_boot_ns(info) >= registry.started_ns:
            # Born while we watched, yet the kernel has no birth for it: the map was full.
            return "unverifiable: born while watched but absent from the kernel's births"
        return None


# A pidfd polls readable once its process has exited (zombie or reaped; kernel/pid.c
# pidfd_poll). POLLHUP is added once it is reaped (Linux 6.9+); either means "gone".
_EXITED = select.POLLIN | select.POLLHUP


# What an fd number must still refer to for a handle to use it: the pidfd's (st_dev, st_ino)
# and, where that inode is shared by every anonymous file (pidfds before pidfs, Linux 6.9), the
# pid its fdinfo names. A number can change under a handle: code that closes a descriptor it
# does not own (libbcc < 0.33 closes an uninitialised ModulePath::fd_, bcc #5193) frees it,
# and the next open anywhere in the process reuses it (another process's pidfd, a file).
_Pin = tuple[int, int, int | None]


@functools.cache
def _anon_inode() -> tuple[int, int]:
    """(st_dev, st_ino) of the kernel's shared anonymous inode (an eventfd lives there)."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


def _fdinfo_pid(fd: int) -> int | None:
    """The pid a pidfd refers to, from /proc/self/fdinfo (``Pid:``; -1 once reaped)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _pin_of(fd: int) -> _Pin | None:
    """What ``fd`` refers to now, or None when the number is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != _anon_inode():
        return st.st_dev, st.st_ino, None  # pidfs: one inode per process
    return st.st_dev, st.st_ino, _fdinfo_pid(fd)


def _still(pin: _Pin, now: _Pin | None) -> bool:
    """Whether ``now`` (what the number refers to) can still be the pidfd pinned as ``pin``.
    Before pidfs only the pid tells pidfds apart, and a reaped process's shows -1: a number
    that now holds a pidfd of another holder of the same pid goes unnoticed there."""
    if now is None or now[:2] != pin[:2]:
        return False
    return pin[2] is None or now[2] in (pin[2], -1)


class ProcessHandle:
    """A process pinned by a pidfd opened when the offender was identified: signals through it
    can never hit a reused pid.

    The handle also remembers what its fd number referred to when it was opened (:data:`_Pin`)
    and checks it before every signal and poll: a number closed behind its back (and perhaps
    reused by another pidfd) is refused with :class:`IdentityUnverified`, never signalled
    through, and never closed by it (it is someone else's now)."""

    def __init__(self, fd: int, info: ProcessInfo, *, policy: str | None = None) -> None:
        """Wrap an already-verified pidfd; use :meth:`bind` instead."""
        pin = _pin_of(fd)
        if pin is None:
            raise ActionError(f"fd {fd} is not open", pid=info.pid, policy=policy)
        self._fd: int | None = fd
        self._pin = pin
        self._lost: int | None = None  # the number, once found closed or replaced
        self._info = info
        self._policy = policy

    @classmethod
    def bind(
        cls,
        pid: int,
        procfs: ProcFS,
        *,
        started_before_ns: int | None = None,
        birth: Birth | None = None,
        registry: BirthRegistry | None = None,
        policy: str | None = None,
        pidfd_open: Callable[[int], int] = os.pidfd_open,
    ) -> ProcessHandle:
        """Pin ``pid`` and read its identity.

        ``birth``: the process must be the one born then (:meth:`Birth.mismatch`, checked
        against ``registry`` at full resolution); a stranger raises :class:`ProcessGone`, an
        unknown birth :class:`IdentityUnverified`. ``started_before_ns`` (CLOCK_BOOTTIME ns):
        a process that started later raises :class:`ProcessGone` (one tick of tolerance; for
        records that carry no birth). Raises :class:`ProcessGone` if the process is gone and
        :class:`PermissionDenied` if the kernel refuses the pidfd.
        """
        try:
            fd = pidfd_open(pid)
        except OSError as err:
            raise _translate(err, "pidfd_open", pid, policy) from err
        try:
            # Order matters. The pidfd is opened first, /proc read second, and the pidfd polled
            # last: a process that has not exited cannot have been reaped, so its pid was not
            # reused while we read /proc, and what we read describes the process we pinned.
            try:
                info = procfs.read(pid)
            except ProcessGone as err:
                raise ProcessGone("gone before /proc was read", pid=pid, policy=policy) from err
            except PermissionDenied as err:
                raise PermissionDenied("cannot read /proc entry", pid=pid, policy=policy) from err
            if _poll_exited(fd, 0, pid, policy):
                raise ProcessGone("exited before it could be pinned", pid=pid, policy=policy)
            # The pinned process was alive after /proc was read, so the births entry read
            # below (or already) is its own: no other process could hold the pid meanwhile.
            why = birth.mismatch(pid, info, procfs, registry) if birth is not None else None
            if why is not None:
                error = (
                    IdentityUnverified
                    if why.startswith(("its birth", "unverifiable"))
                    else ProcessGone
                )
                raise error(why, pid=pid, policy=policy)
            if started_before_ns is not None and procfs.start_boot_ns(info) > started_before_ns:
                # The pidfd pins a process that started after the kernel reported this pid:
                # the reported process is gone and its pid was handed out again.
                raise ProcessGone("pid reused", pid=pid, policy=policy)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, info, policy=policy)

    @property
    def info(self) -> ProcessInfo:
        """What /proc said about the process when it was pinned."""
        return self._info

    @property
    def pid(self) -> int:
        """The process id (as seen in our pid namespace)."""
        return self._info.pid

    @property
    def start_ticks(self) -> int:
        """Start time in clock ticks since boot: with ``pid``, the process's identity."""
        return self._info.start_ticks

    @property
    def comm(self) -> str:
        """The command name at pin time."""
        return self._info.comm

    def fileno(self) -> int:
        """The pidfd, e.g. for an event loop to poll for exit."""
        return self._require_fd()

    def send_signal(self, sig: int) -> None:
        """Signal the pinned process; :class:`ProcessGone` once it has been reaped."""
        fd = self._require_fd()
        try:
            signal.pidfd_send_signal(fd, sig)
        except OSError as err:
            raise _translate(err, f"signal {sig}", self.pid, self._policy) from err

    def verify(self) -> None:
        """Raise :class:`IdentityUnverified` unless the fd is still the pidfd this handle
        opened (see the class)."""
        self._require_fd()

    def has_exited(self) -> bool:
        """True once the process has exited (a zombie counts: it can no longer act)."""
        return _poll_exited(self._require_fd(), 0, self.pid, self._policy)

    def check(self, what: str) -> int:
        """The pid, for an operation that only takes a number (a cgroup move, setpriority),
        right after checking through the pidfd that the process has not exited: until it is
        reaped nobody else can hold its pid. Raises :class:`ProcessGone` otherwise."""
        if self.has_exited():
            raise ProcessGone(f"exited before {what}", pid=self.pid, policy=self._policy)
        return self.pid

    def wait_exit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for the process to exit; True if it did."""
        timeout_ms = max(0, int(timeout_s * 1000))
        return _poll_exited(self._require_fd(), timeout_ms, self.pid, self._policy)

    def close(self) -> None:
        """Release the pidfd. Idempotent. A number that no longer refers to this handle's pidfd
        is left alone: closing it would close whatever reused it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not _still(self._pin, _pin_of(fd)):
            self._lost = fd
            log.error(
                "pidfd %d of pid %d was closed or replaced behind its back; not closing it",
                fd,
                self.pid,
            )
            return
        os.close(fd)

    def __enter__(self) -> ProcessHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<ProcessHandle pid={self.pid} comm={self.comm!r} {state}>"

    def _require_fd(self) -> int:
        """The pidfd, once checked to be the very one this handle opened."""
        fd = self._fd
        if fd is None and self._lost is None:
            raise ActionError("process handle is closed", pid=self.pid, policy=self._policy)
        if fd is not None and _still(self._pin, _pin_of(fd)):
            return fd
        # Never used again, never closed by us: the number belongs to someone else now.
        self._fd, self._lost = None, fd if fd is not None else self._lost
        raise IdentityUnverified(
            f"its pidfd (fd {self._lost}) was closed or replaced behind its back; refusing to "
            "use it",
            pid=self.pid,
            policy=self._policy,
        )


def _poll_exited(fd: int, timeout_ms: int, pid: int, policy: str | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        # EINTR is retried by Python with the remaining timeout (PEP 475).
        events = poller.poll(timeout_ms)
    except OSError as err:
        raise _translate(err, "poll pidfd", pid, policy) from err
    return any(ev & _EXITED for _, ev in events)


def _translate(err: OSError, what: str, pid: int, policy: str | None) -> ActionError:
    if err.errno == errno.ESRCH:
        return ProcessGone(f"{what}: no such process", pid=pid, policy=policy)
    if err.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{what}: {err.strerror}", pid=pid, policy=policy)
    if err.errno == errno.EINVAL and what == "pidfd_open":
        # pidfd_open(2) without PIDFD_THREAD refuses a pid that is not a thread-group leader.
        return ActionError(f"{what}: not a process (thread id?)", pid=pid, policy=policy)
    return ActionError(f"{what}: {err.strerror}", pid=pid, policy=policy)


def signal_pinned(handles: Iterable[ProcessHandle], sig: int) -> int:
    """Send ``sig`` through each pidfd; returns how many were still there to receive it."""
    sent = 0
    for handle in handles:
        with contextlib.suppress(ProcessGone):
            handle.send_signal(sig)
            sent += 1
    return sent
