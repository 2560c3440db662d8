"""Process actions on the test's own children: real signals, nice values and io priorities."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import detect
from remedy.actions.params import (
    ContinueParams,
    IoniceParams,
    NotifyParams,
    ReniceParams,
    StopParams,
    TerminateParams,
)
from remedy.actions.process import ProcessHandle
from remedy.actions.registry import ActionExecutor
from remedy.actions.signals import Continue, Ionice, Notify, Renice, Stop, Terminate, ioprio_get
from remedy.engine.decisions import Decision
from remedy.engine.offender import Subject
from remedy.policy import Policy, RateLimit, Selector, Step
from remedy.proc import ProcFS

IGNORES_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print(1, flush=True); time.sleep(30)"
)


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []
    try:
        yield children
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(5)


def _subject(child: subprocess.Popen[bytes]) -> Subject:
    handle = ProcessHandle.bind(child.pid, ProcFS())
    info = handle.info
    return Subject(
        pid=info.pid,
        start_ticks=info.start_ticks,
        comm=info.comm,
        ppid=info.ppid,
        exe=info.exe,
        uid=info.uid,
        is_kernel_thread=False,
        cgroup="/",
        cgroup_display="/",
        handle=handle,
    )


def _ctx() -> ActionContext:
    return ActionContext(detect(), ProcFS(), scope="process")


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: str) -> str:
    for _ in range(100):
        if _state(pid) == want:
            break
        time.sleep(0.01)
    return _state(pid)


def test_notify_returns_its_message() -> None:
    subject = Subject(1, 1, "x", 0, None, 0, False, "/", "/")
    assert Notify().run(NotifyParams(message="look"), subject, _ctx()) == "look"
    assert Notify().run(NotifyParams(), subject, _ctx()) == ""


def test_renice_and_revert(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen(["sleep", "30"])
    spawn.append(child)
    subject, ctx = _subject(child), _ctx()
    before = os.getpriority(os.PRIO_PROCESS, child.pid)
    record = Renice().undo(ReniceParams(nice=15), subject, ctx, policy="p", ttl_s=1, now_wall=0)
    Renice().run(ReniceParams(nice=15), subject, ctx)
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == 15
    Renice().revert(record, ctx)
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == before


def test_ionice_idle_and_revert(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen(["sleep", "30"])
    spawn.append(child)
    subject, ctx = _subject(child), _ctx()
    params = IoniceParams.model_validate({"class": "idle"})
    before = ioprio_get(child.pid)
    record = Ionice().undo(params, subject, ctx, policy="p", ttl_s=1, now_wall=0)
    Ionice().run(params, subject, ctx)
    assert ioprio_get(child.pid) >> 13 == 3
    Ionice().run(IoniceParams.model_validate({"class": "best-effort", "level": 7}), subject, ctx)
    assert ioprio_get(child.pid) == (2 << 13) | 7
    Ionice().revert(record, ctx)
    assert ioprio_get(child.pid) == before


def test_stop_continue_and_revert(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen(["sleep", "30"])
    spawn.append(child)
    subject, ctx = _subject(child), _ctx()
    record = Stop().undo(StopParams(), subject, ctx, policy="p", ttl_s=1, now_wall=0)
    assert record.pids == (child.pid,)
    Stop().run(StopParams(), subject, ctx)
    assert _wait_state(child.pid, "T") == "T"
    Continue().run(ContinueParams(), subject, ctx)
    assert _wait_state(child.pid, "S") == "S"
    Stop().run(StopParams(), subject, ctx)
    assert _wait_state(child.pid, "T") == "T"
    Stop().revert(record, ctx)
    assert _wait_state(child.pid, "S") == "S"


def test_terminate_kills_one_that_ignores_sigterm(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE)
    spawn.append(child)
    assert child.stdout is not None
    child.stdout.readline()  # SIGTERM is ignored from here on
    subject = _subject(child)
    start = time.monotonic()
    out = Terminate().run(TerminateParams(grace_s=0.3), subject, _ctx())
    assert child.wait(5) == -signal.SIGKILL
    assert time.monotonic() - start >= 0.3
    assert "SIGKILL to 1" in out


def test_terminate_spares_sigkill_when_sigterm_works(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen(["sleep", "30"])
    spawn.append(child)
    subject = _subject(child)
    out = Terminate().run(TerminateParams(grace_s=5), subject, _ctx())
    assert child.wait(5) == -signal.SIGTERM
    assert "SIGKILL to 0" in out


POLICY = Policy(
    name="hogs",
    file=Path("policies/hogs.yaml"),
    signal="fork_rate",
    threshold=1,
    window_s=1.0,
    playbook="end",
    dry_run=False,
    cooldown_s=0.0,
    release_after_s=10.0,
    rate_limit=RateLimit(max_actions=10, per_s=60.0),
    match=Selector(),
)


def _pidfds() -> int:
    """How many pidfds this test process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except FileNotFoundError:
            continue  # the fd listdir itself used
    return count


def test_terminate_through_the_executor_returns_at_once_and_the_tick_kills_after_the_grace(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE)
    spawn.append(stubborn)
    assert stubborn.stdout is not None
    stubborn.stdout.readline()  # SIGTERM is ignored from here on
    executor = ActionExecutor(_ctx())
    subject = _subject(stubborn)
    step = Step("terminate", TerminateParams(grace_s=0.5))
    start = time.monotonic()
    detail = executor.execute(step, subject, POLICY)
    assert time.monotonic() - start < 0.25, "the grace was waited out on the caller's thread"
    assert "SIGTERM to 1 process(es)" in detail
    # The engine lets go of its pidfd (the offender was released): the escalation's is its own.
    assert subject.handle is not None
    subject.handle.close()
    other = subprocess.Popen(["sleep", "30"])  # meanwhile another record is decided and acted on
    spawn.append(other)
    assert executor.execute(Step("stop", StopParams()), _subject(other), POLICY)
    assert _wait_state(other.pid, "T") == "T"
    assert executor.tick() == []
    assert stubborn.poll() is None
    decisions: list[Decision] = []
    deadline = time.monotonic() + 5
    while not decisions and time.monotonic() < deadline:
        time.sleep(0.05)
        decisions = list(executor.tick())
    assert time.monotonic() - start >= 0.5
    assert stubborn.wait(5) == -signal.SIGKILL
    (line,) = decisions
    assert line.outcome == "acted"
    assert "SIGKILL to 1 process(es)" in line.message


def test_terminate_spares_sigkill_when_the_child_exits_and_closes_its_pidfd(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    child = subprocess.Popen(["sleep", "30"])
    spawn.append(child)
    executor = ActionExecutor(_ctx())
    before = _pidfds()
    subject = _subject(child)
    executor.execute(Step("terminate", TerminateParams(grace_s=5)), subject, POLICY)
    assert _pidfds() == before + 2  # the subject's and the escalation's own
    assert child.wait(5) == -signal.SIGTERM  # a zombie no more: reaped by the test
    (line,) = executor.tick()
    assert line.outcome == "skipped"
    assert line.reason == "exited within the 5 s grace: no SIGKILL"
    assert _pidfds() == before + 1  # only the subject's is left: the escalation closed its own
    assert len(executor.timers) == 0
