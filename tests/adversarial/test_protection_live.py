"""Protection on real processes: running a protected binary does not make a process protected.

Copies of /bin/sleep in a root-owned directory (0755, under the sticky /tmp) are made protected
executables of the engine's own Protector (``Protector.for_this_agent``, as the agent builds
it). Children, each bounded (sleep 30) and in the test's own pids-limited cgroup, run them:
dropped to ``nobody``; as ``nobody`` through a setuid-root copy; as root under LD_PRELOAD (of
libc itself: any library counts); as root in another user's login session (login uid set, as
pam_loginuid does and sudo keeps); as root plainly; and as root from a copy upgraded in place
(a new file renamed over it, so /proc/PID/exe reads "… (deleted)"). Subjects are built from
each child's real /proc through a pidfd, as identification builds them. The sandbox kills the
children (only they live in it) and the directory is removed, even on failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remedy.actions.process import ProcessHandle
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.proc import ProcFS
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

NOBODY = 65534
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
DROP = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


@pytest.fixture
def bindir() -> Iterator[Path]:
    """A root-owned 0755 directory others can traverse but not write, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="remedy-protect-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy(bindir: Path, name: str, mode: int = 0o755) -> Path:
    exe = bindir / name
    shutil.copy("/bin/sleep", exe)
    exe.chmod(mode)
    return exe


def _spawn(
    box: CgroupSandbox,
    argv: list[str],
    exe: Path,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> int:
    """Start ``argv`` in the sandbox and wait until it runs ``exe`` (the cgroup wrapper and
    setpriv exec first) with its new environment in place: the exe link changes early in
    execve, before the new stack (and so /proc/PID/environ) is set up."""
    proc = box.spawn(argv, env=env or ENV, preexec_fn=preexec)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            running = os.readlink(f"/proc/{proc.pid}/exe").startswith(str(exe))
            if running and b"PATH=" in Path(f"/proc/{proc.pid}/environ").read_bytes():
                return proc.pid
        except OSError:
            pass
        assert proc.poll() is None, f"{argv} exited with {proc.returncode}"
        time.sleep(0.01)
    raise AssertionError(f"{argv} never ran {exe}")


def _subject(pid: int) -> Subject:
    handle = ProcessHandle.bind(pid, ProcFS())
    info = handle.info
    return Subject(
        pid=info.pid,
        start_ticks=info.start_ticks,
        comm=info.comm,
        ppid=info.ppid,
        exe=info.exe,
        uid=info.uid,
        is_kernel_thread=info.is_kernel_thread,
        cgroup="/",
        cgroup_display="/",
        handle=handle,
    )


def _verdict(protector: Protector, pid: int) -> str | None:
    """The engine's guard on the offender; the reach check on /proc agrees with it."""
    subject = _subject(pid)
    try:
        why = protector.why_protected(subject)
        assert protector.why(ProcFS().read(pid)) == why
        return why
    finally:
        if subject.handle is not None:
            subject.handle.close()


def _uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text().split("\n")
    return [int(u) for u in next(x for x in status if x.startswith("Uid:\t")).split("\t")[1:]]


def _libc() -> str:
    maps = Path("/proc/self/maps").read_text().split("\n")
    return next(line.split()[-1] for line in maps if "/libc.so" in line)


def _protector(*exes: Path) -> Protector:
    return Protector.for_this_agent(ProcFS(), os.getpid(), extra_exes=[str(e) for e in exes])


def test_a_protected_binary_run_by_root_is_protected(
    test_cgroup: CgroupSandbox, bindir: Path
) -> None:
    daemon = _copy(bindir, "daemon")
    pid = _spawn(test_cgroup, [str(daemon), "30"], daemon)
    assert _verdict(_protector(daemon), pid) == f"protected executable {daemon}"


def test_a_protected_binary_run_by_nobody_is_not_protected(
    test_cgroup: CgroupSandbox, bindir: Path
) -> None:
    daemon = _copy(bindir, "daemon")
    pid = _spawn(test_cgroup, [*DROP, str(daemon), "30"], daemon)
    assert _uids(pid) == [NOBODY] * 4
    assert _verdict(_protector(daemon), pid) is None


def test_a_setuid_root_protected_binary_run_by_nobody_is_not_protected(
    test_cgroup: CgroupSandbox, bindir: Path
) -> None:
    daemon = _copy(bindir, "daemon", mode=0o4755)
    pid = _spawn(test_cgroup, [*DROP, str(daemon), "30"], daemon)
    assert _uids(pid) == [NOBODY, 0, 0, 0], "the kernel made it setuid root"
    assert _verdict(_protector(daemon), pid) is None


def test_a_protected_binary_run_by_root_under_ld_preload_is_not_protected(
    test_cgroup: CgroupSandbox, bindir: Path
) -> None:
    daemon = _copy(bindir, "daemon")
    pid = _spawn(test_cgroup, [str(daemon), "30"], daemon, env={**ENV, "LD_PRELOAD": _libc()})
    assert _uids(pid) == [0] * 4
    assert _verdict(_protector(daemon), pid) is None


def test_a_protected_binary_run_by_root_in_a_users_login_session_is_not_protected(
    test_cgroup: CgroupSandbox, bindir: Path
) -> None:
    def session_of_uid_1000() -> None:
        # What pam_loginuid does at login; sudo and su keep it. Needs CAP_AUDIT_CONTROL.
        with open("/proc/self/loginuid", "w") as f:
            f.write("1000")

    daemon = _copy(bindir, "daemon")
    pid = _spawn(test_cgroup, [str(daemon), "30"], daemon, preexec=session_of_uid_1000)
    assert Path(f"/proc/{pid}/loginuid").read_text() == "1000"
    assert _verdict(_protector(daemon), pid) is None


def test_a_protected_daemon_upgraded_in_place_stays_protected(
    test_cgroup: CgroupSandbox, bindir: Path
) -> None:
    daemon = _copy(bindir, "daemon")
    pid = _spawn(test_cgroup, [str(daemon), "30"], daemon)
    # What a package manager does: the new file is written aside and renamed over the old.
    new = _copy(bindir, "daemon.dpkg-new")
    new.rename(daemon)
    assert os.readlink(f"/proc/{pid}/exe") == f"{daemon} (deleted)"
    why = _verdict(_protector(daemon), pid)
    assert why == f"protected executable {daemon} (replaced on disk since it started)"


def test_nobody_cannot_ride_a_deleted_protected_name(
    test_cgroup: CgroupSandbox, bindir: Path
) -> None:
    daemon = _copy(bindir, "daemon")
    pid = _spawn(test_cgroup, [*DROP, str(daemon), "30"], daemon)
    daemon.unlink()
    assert os.readlink(f"/proc/{pid}/exe") == f"{daemon} (deleted)"
    assert _verdict(_protector(daemon), pid) is None
