"""Guards the engine applies before any action: rate limits and protected processes.

The engine owns these, not the actions, so no action can forget them (oomd's lesson).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from remedy.engine.offender import Subject
from remedy.errors import RemedyError
from remedy.proc import ProcFS

# Exact paths, never substrings: "sshd" as a substring would also protect "/tmp/not-sshd".
PROTECTED_EXES = frozenset(
    {
        "/sbin/init",
        "/lib/systemd/systemd",
        "/usr/lib/systemd/systemd",
        "/lib/systemd/systemd-journald",
        "/usr/lib/systemd/systemd-journald",
        "/lib/systemd/systemd-logind",
        "/usr/lib/systemd/systemd-logind",
        "/lib/systemd/systemd-udevd",
        "/usr/lib/systemd/systemd-udevd",
        "/usr/sbin/sshd",
        "/usr/bin/dbus-daemon",
        "/usr/bin/containerd",
        "/usr/bin/dockerd",
        "/usr/bin/kubelet",
    }
)


class RateLimiter:
    """At most ``max_actions`` per ``per_s`` seconds, over a sliding window, per policy."""

    def __init__(self, max_actions: int, per_s: float) -> None:
        self.max_actions = max_actions
        self.per_s = per_s
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._times and now - self._times[0] >= self.per_s:
            self._times.popleft()

    def allow(self, now: float) -> bool:
        """True (and the action is counted) if one more action fits in the window."""
        self._expire(now)
        if len(self._times) >= self.max_actions:
            return False
        self._times.append(now)
        return True

    def retry_in(self, now: float) -> float:
        """Seconds until the next action would be allowed."""
        self._expire(now)
        if len(self._times) < self.max_actions:
            return 0.0
        return self._times[0] + self.per_s - now


@dataclass(frozen=True)
class Protector:
    """Decides which processes remedy never touches."""

    agent_pid: int
    agent_ancestors: frozenset[int]
    exes: frozenset[str] = PROTECTED_EXES

    @classmethod
    def for_this_agent(
        cls, procfs: ProcFS, agent_pid: int, extra_exes: Iterable[str] = ()
    ) -> Protector:
        """Protect this agent, its ancestors (whoever started it) and the well-known daemons."""
        try:
            ancestors = frozenset(p.pid for p in procfs.ancestors(agent_pid))
        except RemedyError:
            ancestors = frozenset({1})
        return cls(agent_pid, ancestors, PROTECTED_EXES | frozenset(extra_exes))

    def why_protected(self, subject: Subject) -> str | None:
        """A reason when ``subject`` must not be acted on, else None."""
        if subject.pid <= 1:
            return "pid 1 (init)"
        if subject.is_kernel_thread:
            return "kernel thread"
        if subject.pid == self.agent_pid:
            return "the agent itself"
        if subject.pid in self.agent_ancestors:
            return "an ancestor of the agent"
        if subject.exe is not None and subject.exe in self.exes:
            return f"protected executable {subject.exe}"
        return None
