"""Shared fixtures: the kernel gate and a test cgroup sandbox that is always cleaned up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from remedy.service.launcher import in_cgroups

CGROUP_ROOT = Path("/sys/fs/cgroup")
REQUIRE_BPF = os.environ.get("REMEDY_REQUIRE_BPF") == "1"


def bpf_unavailable() -> str | None:
    """Why the kernel tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401, PLC0415
    except ImportError:
        return "python cannot import bcc (Debian python3-bpfcc)"
    if not Path("/sys/kernel/tracing/events/sched/sched_process_fork").is_dir():
        return "tracefs not mounted or sched:sched_process_fork missing"
    return None


@pytest.fixture(scope="session")
def bpf_ready() -> None:
    """Skip kernel tests where BPF cannot load; under REMEDY_REQUIRE_BPF=1 fail instead."""
    why = bpf_unavailable()
    if why is None:
        return
    if REQUIRE_BPF:
        pytest.fail(f"REMEDY_REQUIRE_BPF=1 but the kernel tier cannot run: {why}")
    pytest.skip(f"kernel tier unavailable: {why}")


class CgroupSandbox:
    """A uniquely named cgroup (v1: in the pids and cpu hierarchies; v2: one directory) with a
    pids limit, so every storm a test starts is bounded. Teardown kills only processes inside it
    (all spawned by the test) and removes the whole subtree, deepest first."""

    def __init__(self, name: str, pids_max: int = 256) -> None:
        self.name = name
        self.v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        roots = [CGROUP_ROOT] if self.v2 else [CGROUP_ROOT / "pids", CGROUP_ROOT / "cpu"]
        self.dirs = [r / name for r in roots]
        for d in self.dirs:
            d.mkdir()
        (self.dirs[0] / "pids.max").write_text(f"{pids_max}\n")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def rel(self) -> str:
        return f"/{self.name}"

    @property
    def pids_dir(self) -> Path:
        return self.dirs[0]

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            in_cgroups(self.procs_files(), argv), **kwargs  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def members(self) -> list[int]:
        pids: set[int] = set()
        for d in self.dirs:
            for procs in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in procs.read_text().split())
        return sorted(pids)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for _ in range(100):
            members = self.members()
            if not members:
                break
            for pid in members:  # only descendants of what this test spawned live here
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(pid)
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    finally:
                        os.close(fd)
            time.sleep(0.05)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for d in self.dirs:
            if not d.exists():
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def test_cgroup() -> Iterator[CgroupSandbox]:
    if os.geteuid() != 0:
        if REQUIRE_BPF:
            pytest.fail("REMEDY_REQUIRE_BPF=1 but not root: cannot create test cgroups")
        pytest.skip("needs root to create cgroups")
    box = CgroupSandbox(f"remedy-test-{uuid.uuid4().hex[:12]}")
    try:
        yield box
    finally:
        box.cleanup()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
