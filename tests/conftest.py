"""Shared fixtures: the kernel gate and a test cgroup sandbox that is always cleaned up."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.process import ProcessHandle
from remedy.engine.offender import Subject
from remedy.proc import ProcFS
from testkit.sandbox import CgroupSandbox

__all__ = ["CgroupSandbox"]
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


@pytest.fixture
def pin() -> Iterator[Callable[..., Subject]]:
    """``pin(pid, driver, cgroup=None)``: a Subject for the test's own child, pinned through a
    pidfd as identification pins it (its cgroup and that cgroup's inode read from ``driver``);
    every pidfd is closed at teardown."""
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
