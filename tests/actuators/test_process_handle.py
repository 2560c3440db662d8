"""ProcessHandle with real pidfds and real signals, sent only to this test's own children."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remedy.actions.process import ProcessHandle
from remedy.errors import ActionError, PermissionDenied, ProcessGone
from remedy.proc import ProcFS

Spawn = Callable[[], "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start `sleep 30` children; every one is killed and reaped at teardown."""
    children: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "30"])
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)


@pytest.fixture
def procfs() -> ProcFS:
    return ProcFS()


def unused_pid() -> int:
    # Pids are always below pid_max (kernel/pid.c alloc_pid), so this one never exists.
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def wait_zombie(pid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ProcFS().read(pid).state != "Z":
        assert time.monotonic() < deadline, f"pid {pid} did not become a zombie"
        time.sleep(0.01)


def test_bind_reads_identity(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    with ProcessHandle.bind(child.pid, procfs) as handle:
        assert handle.pid == child.pid
        assert handle.comm == "sleep"
        assert handle.start_ticks == procfs.read(child.pid).start_ticks
        assert handle.info.ppid == os.getpid()
        assert handle.fileno() >= 0


def test_sigterm_through_the_pidfd_kills(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    with ProcessHandle.bind(child.pid, procfs) as handle:
        assert not handle.has_exited()
        assert not handle.wait_exit(0.05)
        handle.send_signal(signal.SIGTERM)
        # Exit is visible on the pidfd before the parent reaps the zombie.
        assert handle.wait_exit(5)
        assert handle.has_exited()
    assert child.wait(5) == -signal.SIGTERM


def test_signal_after_reap_is_process_gone(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    with ProcessHandle.bind(child.pid, procfs, policy="forkstorm") as handle:
        child.kill()
        child.wait(5)
        # The pid number may already belong to someone else; the pidfd still names the reaped
        # process, so the kernel refuses with ESRCH instead of signalling the newcomer.
        with pytest.raises(ProcessGone) as exc:
            handle.send_signal(signal.SIGTERM)
        assert exc.value.pid == child.pid
        assert exc.value.policy == "forkstorm"
        assert handle.has_exited()


def test_signalling_a_zombie_is_harmless(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    with ProcessHandle.bind(child.pid, procfs) as handle:
        child.send_signal(signal.SIGKILL)
        assert handle.wait_exit(5)
        handle.send_signal(signal.SIGTERM)  # not reaped yet: the kernel accepts and ignores it
    child.wait(5)


def test_bind_refuses_a_process_started_after_the_report(spawn: Spawn, procfs: ProcFS) -> None:
    reported_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    # starttime is truncated to a clock tick (10 ms at USER_HZ=100); start well after it.
    time.sleep(0.05)
    child = spawn()
    with pytest.raises(ProcessGone, match="pid reused") as exc:
        ProcessHandle.bind(child.pid, procfs, started_before_ns=reported_ns, policy="p")
    assert exc.value.pid == child.pid
    assert exc.value.policy == "p"
    assert child.poll() is None  # nothing was sent to it


def test_bind_accepts_a_process_started_before_the_report(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    reported_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    with ProcessHandle.bind(child.pid, procfs, started_before_ns=reported_ns) as handle:
        assert handle.pid == child.pid


def test_bind_nonexistent_pid_is_process_gone(procfs: ProcFS) -> None:
    pid = unused_pid()
    with pytest.raises(ProcessGone) as exc:
        ProcessHandle.bind(pid, procfs)
    assert exc.value.pid == pid


def test_bind_reaped_child_is_process_gone(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    child.kill()
    child.wait(5)
    with pytest.raises(ProcessGone):
        ProcessHandle.bind(child.pid, procfs)


def test_bind_zombie_is_process_gone(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    child.send_signal(signal.SIGKILL)
    wait_zombie(child.pid)
    # pidfd_open succeeds on a zombie and /proc still lists it; the pidfd says it has exited.
    with pytest.raises(ProcessGone, match="exited"):
        ProcessHandle.bind(child.pid, procfs)


def test_bind_translates_pidfd_open_errors(procfs: ProcFS) -> None:
    def refuse(err: int) -> Callable[[int], int]:
        def pidfd_open(pid: int) -> int:
            raise OSError(err, os.strerror(err))

        return pidfd_open

    with pytest.raises(PermissionDenied) as denied:
        ProcessHandle.bind(os.getpid(), procfs, policy="p", pidfd_open=refuse(errno.EPERM))
    assert (denied.value.pid, denied.value.policy) == (os.getpid(), "p")
    assert isinstance(denied.value.__cause__, PermissionError)
    with pytest.raises(ProcessGone):
        ProcessHandle.bind(os.getpid(), procfs, pidfd_open=refuse(errno.ESRCH))


def test_bind_closes_the_pidfd_when_it_refuses(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    opened: list[int] = []

    def pidfd_open(pid: int) -> int:
        opened.append(os.pidfd_open(pid))
        return opened[-1]

    with pytest.raises(ProcessGone):
        ProcessHandle.bind(child.pid, procfs, started_before_ns=0, pidfd_open=pidfd_open)
    with pytest.raises(OSError) as exc:
        os.fstat(opened[0])
    assert exc.value.errno == errno.EBADF


def test_close_is_idempotent_and_final(spawn: Spawn, procfs: ProcFS) -> None:
    child = spawn()
    handle = ProcessHandle.bind(child.pid, procfs)
    fd = handle.fileno()
    handle.close()
    handle.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ActionError, match="closed"):
        handle.send_signal(signal.SIGTERM)
    with pytest.raises(ActionError, match="closed"):
        handle.has_exited()
    assert child.poll() is None
