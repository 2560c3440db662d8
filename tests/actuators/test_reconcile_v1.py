"""``remedy reconcile`` against a real v1 cpu limit, with no agent running (root only).

A throttle is applied through the undoer and its journal, the "agent" goes away, and the CLI
alone (no policies, no BPF, no self-test) takes the expired limit back, or, while something
else holds the journal's lock, touches nothing. The fixture kills the child it spawned and
removes its cgroups, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV1Driver
from remedy.actions.journal import Journal
from remedy.actions.params import ThrottleCpuParams
from remedy.actions.process import ProcessHandle
from remedy.actions.registry import ACTIONS
from remedy.actions.throttle import ThrottleCpu
from remedy.actions.undoer import Undoer
from remedy.clock import SystemClock
from remedy.engine.offender import Subject
from remedy.proc import ProcFS
from remedy.service.reconcile import EXIT_BUSY

ROOT = Path("/sys/fs/cgroup")
TTL_S = 3.0  # long enough for a first reconcile to start and find it not yet expired
HIERARCHIES = ("pids", "cpu", "memory", "freezer")
REPO = Path(__file__).resolve().parents[2]
REMEDY = Path(sys.executable).parent / "remedy"  # the installed command, as the unit runs it


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    missing = [h for h in HIERARCHIES if not (ROOT / h / "tasks").exists()]
    return f"no v1 hierarchies {missing}" if missing else None


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable())),
]


@pytest.fixture
def throttled(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """A sleep in its own cgroup, throttled to 0.25 CPU with a TTL_S TTL by an "agent" that is
    gone: (journal, cgroup, quota before)."""
    name = f"remedy-test-{uuid.uuid4().hex}"
    rel = f"/{name}/app"
    driver = CgroupV1Driver(ROOT, ProcFS())
    child = subprocess.Popen(["sleep", "30"])
    handle: ProcessHandle | None = None
    try:
        for h in HIERARCHIES:
            (ROOT / h / rel[1:]).mkdir(parents=True)
            (ROOT / h / rel[1:] / "cgroup.procs").write_text(str(child.pid))
        handle = ProcessHandle.bind(child.pid, ProcFS())
        display, inode = driver.display_path(rel), driver.inode(rel)
        subject = Subject.pinned(handle.info, handle, rel, display, cgroup_inode=inode)
        before = _quota(rel)
        path = tmp_path / "undo.jsonl"
        ctx = ActionContext(driver, ProcFS(), f"/{name}/q", scope="cgroup")
        clock = SystemClock()
        undoer = Undoer(Journal(path, clock), ctx, clock, ACTIONS)
        undoer.apply(
            ThrottleCpu(), ThrottleCpuParams(cpu=0.25), subject, ctx, policy="p", ttl_s=TTL_S
        )
        undoer.journal.close()  # the agent is gone; nothing reverted it
        assert _quota(rel) == "25000"
        yield path, rel, before
    finally:
        if handle is not None:
            handle.close()
        child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
        for h in HIERARCHIES:
            for sub in (rel, f"/{name}"):
                for _ in range(50):
                    try:
                        (ROOT / h / sub[1:]).rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)
        leftover = [h for h in HIERARCHIES if (ROOT / h / name).exists()]
        assert not leftover, f"test cgroup left behind in {leftover}"


def _quota(rel: str) -> str:
    return (ROOT / "cpu" / rel[1:] / "cpu.cfs_quota_us").read_text().strip()


def _reconcile(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REMEDY), "reconcile", "--journal", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def test_reconcile_reverts_an_expired_throttle_with_no_agent(
    throttled: tuple[Path, str, str],
) -> None:
    path, rel, before = throttled
    early = _reconcile(path)
    assert early.returncode == 0, early.stdout + early.stderr
    assert _quota(rel) == "25000"  # not expired yet: left for its TTL
    time.sleep(TTL_S)
    done = _reconcile(path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "throttle_cpu on " + rel in done.stdout
    assert _quota(rel) == before
    journal = Journal(path, SystemClock())
    assert journal.active() == []
    journal.close()


def test_reconcile_touches_nothing_while_the_journal_is_held(
    throttled: tuple[Path, str, str],
) -> None:
    path, rel, _before = throttled
    time.sleep(TTL_S)
    agent = Journal(path, SystemClock())  # a running agent holds the lock
    try:
        content = path.read_bytes()
        held = _reconcile(path)
        assert held.returncode == EXIT_BUSY, held.stdout + held.stderr
        assert "in use by another process" in held.stdout
        assert _quota(rel) == "25000"
        assert path.read_bytes() == content
    finally:
        agent.close()


def test_the_sidecar_mode_waits_for_the_agent_then_reverts_and_gives_the_lock_back(
    throttled: tuple[Path, str, str],
) -> None:
    path, rel, before = throttled
    time.sleep(TTL_S)
    agent = Journal(path, SystemClock())  # the agent runs: passes touch nothing
    sidecar = subprocess.Popen(
        [str(REMEDY), "reconcile", "--journal", str(path), "--every", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1.5)  # several passes
        assert sidecar.poll() is None
        assert _quota(rel) == "25000"
        agent.close()  # the agent dies
        deadline = time.monotonic() + 10
        while _quota(rel) != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _quota(rel) == before
        # Between passes the lock is free: a new agent gets the journal within a pass.
        again = Journal(path, SystemClock(), lock_wait_s=2.0)
        assert again.active() == []
        again.close()
    finally:
        sidecar.terminate()
        out, _ = sidecar.communicate(timeout=10)
    assert sidecar.returncode == 0, out
    assert out.count("in use by another process") == 1, out  # said once, not every pass
