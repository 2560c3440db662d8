"""The agent's ancestors are protected as the processes they were, not as pid numbers
that the next process may get once an ancestor (a shell, sudo) has exited."""

from __future__ import annotations

import os

from remedy.engine.guards import Protector
from remedy.proc import ProcessInfo, ProcFS


def _info(pid: int, start_ticks: int) -> ProcessInfo:
    return ProcessInfo(
        pid=pid,
        ppid=1,
        comm="x",
        state="R",
        start_ticks=start_ticks,
        flags=0,
        uid=1000,
        exe="/tmp/x",
        cmdline=(),
    )


def test_a_reused_ancestor_pid_is_not_protected() -> None:
    guard = Protector.for_this_agent(ProcFS(), os.getpid(), ())
    parent = ProcFS().read(os.getppid())
    assert guard.why(_info(parent.pid, parent.start_ticks)) == "an ancestor of the agent"
    # The same number, held by a process born later: a stranger.
    assert guard.why(_info(parent.pid, parent.start_ticks + 1)) is None
