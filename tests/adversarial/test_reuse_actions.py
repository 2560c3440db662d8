"""Pid reuse between identification and each action, and between an action and its revert.

The offender is identified (pinned), dies, and a newcomer takes its pid (ns_last_pid). Every
action run on the stale subject, and every revert of a change made to the offender, must leave
the newcomer exactly as it was: same cgroups, nice, io priority, run state, alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reuse_helpers import PARAMS, SLEEPER, spawn_at, wait_gone

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import detect
from remedy.actions.process import ProcessHandle
from remedy.actions.registry import ACTIONS
from remedy.actions.signals import ioprio_get
from remedy.engine.offender import Subject
from remedy.errors import ActionError
from remedy.proc import ProcFS
from testkit.sandbox import CgroupSandbox

pytestmark = pytest.mark.root

SCOPES = ("process", "tree")


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ActionContext]:
    cgroups = detect()
    root = f"/remedy-test-q-{os.getpid()}-{time.monotonic_ns()}"
    context = ActionContext(cgroups, ProcFS(), quarantine_root=root)
    try:
        yield context
    finally:
        if cgroups.exists(root):
            cgroups.remove(root)


def _subject(pid: int, ctx: ActionContext) -> Subject:
    handle = ProcessHandle.bind(pid, ctx.procfs)
    cgroup = ctx.cgroups.cgroup_of(pid)
    display, inode = ctx.cgroups.display_path(cgroup), ctx.cgroups.inode(cgroup)
    return Subject.pinned(handle.info, handle, cgroup, display, cgroup_inode=inode)


def _state(pid: int) -> str:
    """Stopped, dead or up (R and S are one: a child may still be starting)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return stat if stat in ("T", "t", "Z", "X") else "up"


def _snapshot(pid: int) -> tuple[object, ...]:
    return (
        Path(f"/proc/{pid}/cgroup").read_text(),
        os.getpriority(os.PRIO_PROCESS, pid),
        ioprio_get(pid),
        _state(pid),
    )


def _stale_subject(
    box: CgroupSandbox, ctx: ActionContext
) -> tuple[Subject, subprocess.Popen[bytes]]:
    """A subject pinned while its process lived, and the newcomer now holding its pid."""
    offender = box.spawn(SLEEPER)
    time.sleep(0.05)
    subject = _subject(offender.pid, ctx)
    offender.kill()
    wait_gone(offender)
    newcomer = spawn_at(box, offender.pid, SLEEPER)
    time.sleep(0.05)
    return subject, newcomer


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("action", sorted(PARAMS))
def test_no_action_on_a_stale_subject_reaches_the_newcomer(
    action: str, scope: str, test_cgroup: CgroupSandbox, ctx: ActionContext
) -> None:
    subject, newcomer = _stale_subject(test_cgroup, ctx)
    try:
        before = _snapshot(newcomer.pid)
        scoped = ActionContext(ctx.cgroups, ctx.procfs, ctx.quarantine_root, scope=scope)
        try:
            ACTIONS[action].run(PARAMS[action], subject, scoped)
        except ActionError as err:
            assert err.outcome == "gone", err
        time.sleep(0.05)
        assert newcomer.poll() is None, f"{action} killed the newcomer"
        assert _snapshot(newcomer.pid) == before, f"{action} reached the newcomer"
    finally:
        assert subject.handle is not None
        subject.handle.close()
        newcomer.kill()
        newcomer.wait(5)


@pytest.mark.parametrize("action", ["renice", "ionice", "stop"])
def test_no_revert_reaches_a_newcomer_that_took_the_offenders_pid(
    action: str, test_cgroup: CgroupSandbox, ctx: ActionContext
) -> None:
    """The change is made to the live offender; it dies; the revert finds a stranger."""
    offender = test_cgroup.spawn(SLEEPER)
    time.sleep(0.05)
    subject = _subject(offender.pid, ctx)
    impl = ACTIONS[action]
    record = impl.undo(  # type: ignore[attr-defined]
        PARAMS[action], subject, ctx, policy="p", ttl_s=60, now_wall=time.time()
    )
    impl.run(PARAMS[action], subject, ctx)
    assert subject.handle is not None
    subject.handle.close()
    offender.kill()
    wait_gone(offender)
    # A newcomer unlike what the revert would restore: reniced, in the idle io class, stopped.
    newcomer = spawn_at(test_cgroup, offender.pid, ["nice", "-n", "7", *SLEEPER])
    try:
        time.sleep(0.1)
        newcomer.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        before = _snapshot(newcomer.pid)
        assert before[1] == 7 and before[3] == "T"
        detail = impl.revert(record, ctx)  # type: ignore[attr-defined]
        assert "on 0 process(es)" in detail, detail
        time.sleep(0.05)
        assert _snapshot(newcomer.pid) == before
    finally:
        newcomer.kill()
        newcomer.wait(5)


class _ListedEarlier(ActionContext):
    """A context whose tree listing is from a moment ago: a descendant listed then has died and
    its pid belongs to a stranger now (the race between listing /proc and signalling)."""

    stale: tuple[int, ...] = ()

    def _descendants(self, root: int) -> list[int]:
        return list(self.stale)


class _StaleMembers:
    """A cgroup driver whose first membership read is from a moment ago (same race, cgroups)."""

    def __init__(self, real: object, stale: list[int]) -> None:
        self._real = real
        self._stale: list[int] | None = stale

    def members(self, rel: str) -> list[int]:
        if self._stale is not None:
            stale, self._stale = self._stale, None
            return stale
        return self._real.members(rel)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.mark.parametrize("action", ["kill", "terminate", "renice", "stop"])
@pytest.mark.parametrize("scope", ["tree", "cgroup"])
def test_a_member_listed_before_its_pid_was_reused_is_judged_again_once_pinned(
    action: str, scope: str, test_cgroup: CgroupSandbox, ctx: ActionContext, tmp_path: Path
) -> None:
    offender = test_cgroup.spawn(SLEEPER)
    # The stranger lives outside the offender's tree and cgroup (a cgroup of its own).
    with CgroupSandbox(f"remedy-test-stranger-{os.getpid()}-{time.monotonic_ns()}") as other:
        stranger = other.spawn(SLEEPER)
        try:
            time.sleep(0.05)
            subject = _subject(offender.pid, ctx)
            before = _snapshot(stranger.pid)
            if scope == "tree":
                scoped: ActionContext = _ListedEarlier(
                    ctx.cgroups, ctx.procfs, ctx.quarantine_root, scope="tree"
                )
                object.__setattr__(scoped, "stale", (stranger.pid,))
            else:
                driver = _StaleMembers(ctx.cgroups, [offender.pid, stranger.pid])
                scoped = ActionContext(
                    driver,  # type: ignore[arg-type]
                    ctx.procfs,
                    ctx.quarantine_root,
                    scope="cgroup",
                )
            ACTIONS[action].run(PARAMS[action], subject, scoped)
            time.sleep(0.05)
            assert stranger.poll() is None, f"{action} ({scope}) killed a stranger"
            assert _snapshot(stranger.pid) == before, f"{action} ({scope}) reached a stranger"
        finally:
            offender.kill()
            offender.wait(5)
            stranger.kill()
            stranger.wait(5)
