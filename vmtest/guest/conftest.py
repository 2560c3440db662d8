"""In-VM fixtures: a cgroup subtree delegated the way systemd delegates one.

``systemd-run -p Delegate=yes`` makes a transient service whose cgroup systemd hands over: the
cpu, memory, pids (and io) controllers are enabled down to it, and the delegatee enables them
below it itself, after moving its processes into a leaf (the "no internal processes" rule).
Every process a test starts runs in that unit (TasksMax bounds it); the unit is stopped and its
whole subtree removed at teardown, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remedy.actions.cgroups import CgroupDriver, CgroupV2Driver
from remedy.actions.process import ProcessHandle
from remedy.engine.offender import Subject
from remedy.proc import ProcFS
from testkit.launcher import in_cgroups

ROOT = Path("/sys/fs/cgroup")


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=60, check=False
    )


@dataclass
class Delegated:
    """A delegated transient unit: ``rel`` is its cgroup, ``leaf`` where its processes live."""

    unit: str
    rel: str
    driver: CgroupV2Driver
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def leaf(self) -> str:
        return f"{self.rel}/init"

    def path(self, rel: str) -> Path:
        return ROOT / rel.lstrip("/")

    def spawn(
        self, argv: Sequence[str], where: str | None = None, **kw: object
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``where`` (default: the leaf) from its first instruction."""
        procs = self.path(where or self.leaf) / "cgroup.procs"
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            in_cgroups([procs], argv),
            **kw,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def wait_member(self, pid: int, rel: str, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while pid not in self.driver.members(rel):
            assert time.monotonic() < deadline, f"{pid} never joined {rel}"
            time.sleep(0.02)


def _subtree(top: Path) -> list[Path]:
    if not top.is_dir():
        return []
    return sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))


def _kill_members(top: Path) -> None:
    for procs in top.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            for pid in (int(x) for x in procs.read_text().split()):
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(pid)
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    finally:
                        os.close(fd)


@pytest.fixture
def delegated() -> Iterator[Delegated]:
    """A fresh delegated unit with its main process already moved into ``init``."""
    unit = f"remedy-vmtest-{uuid.uuid4().hex[:10]}.service"
    started = subprocess.run(
        [
            "systemd-run",
            "--unit",
            unit,
            "-p",
            "Delegate=yes",
            "-p",
            "TasksMax=256",
            "-p",
            "CPUAccounting=yes",
            "-p",
            "MemoryAccounting=yes",
            "sleep",
            "600",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    try:
        group = _systemctl("show", "-P", "ControlGroup", unit).stdout.strip()
        assert group.startswith("/system.slice/"), group
        box = Delegated(unit, group, CgroupV2Driver(ROOT, ProcFS()))
        top = box.path(group)
        (top / "init").mkdir()
        main = int(_systemctl("show", "-P", "MainPID", unit).stdout.strip())
        box.driver.move(main, box.leaf)
        yield box
        _teardown(unit, box.path(group))
        for proc in box.procs:  # reap the test's own children
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    finally:
        _teardown(unit, ROOT / "system.slice" / unit)


def _teardown(unit: str, top: Path) -> None:
    """Stop the unit (systemd kills everything in its cgroup, the subtree too, and removes it);
    whatever is left is killed (all the test's own) and removed deepest first."""
    _systemctl("stop", unit)
    for _ in range(50):
        with contextlib.suppress(OSError):
            _kill_members(top)
        busy = False
        for sub in [*_subtree(top), top]:
            with contextlib.suppress(OSError):
                sub.rmdir()
            busy = busy or sub.exists()
        if not busy:
            break
        time.sleep(0.1)
    _systemctl("reset-failed", unit)


@pytest.fixture
def pin() -> Iterator[Callable[..., Subject]]:
    """As tests/conftest.py's: a Subject for the test's own child, pinned through a pidfd."""
    handles: list[ProcessHandle] = []

    def _pin(pid: int, driver: CgroupDriver, cgroup: str | None = None) -> Subject:
        handle = ProcessHandle.bind(pid, ProcFS())
        handles.append(handle)
        rel = driver.cgroup_of(pid) if cgroup is None else cgroup
        return Subject.pinned(
            handle.info, handle, rel, driver.display_path(rel), cgroup_inode=driver.inode(rel)
        )

    yield _pin
    for handle in handles:
        handle.close()


@pytest.fixture(scope="session")
def bpf_ready() -> None:
    """The VM always can load BPF: anything else is a failure, never a skip."""
    try:
        import bcc  # noqa: F401, PLC0415
    except ImportError as err:
        pytest.fail(f"python cannot import bcc in the VM: {err}")
    assert Path("/sys/kernel/tracing/events/sched/sched_process_fork").is_dir()
