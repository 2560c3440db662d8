"""Guards the engine applies before any action: rate limits, protected processes, and what a
step can do to a process (end it, or merely change it).

The engine owns these, not the actions, so no action can forget them (oomd's lesson).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from remedy.engine.offender import Subject
from remedy.errors import RemedyError
from remedy.policy.model import Policy, Step
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


# Actions that never end a process: each changes something the undo journal takes back
# (SIGCONT for stop, the old limits, the old cgroup), or nothing at all (notify). An action
# missing here (a new one) is taken to end processes until someone says otherwise: on degraded
# data the safe mistake is to do too little.
NEVER_ENDS = frozenset(
    {
        "notify",
        "quarantine",
        "throttle_cpu",
        "limit_memory",
        "limit_pids",
        "freeze",
        "thaw",
        "io_weight",
        "renice",
        "ionice",
        "stop",
        "continue",
    }
)


def ends_process(step: Step) -> str | None:
    """How ``step`` can end a process (a kill, a terminate, a SIGKILL/SIGTERM, a kernel arm), or
    None when it cannot. One rule for every guard that must never end a process, so a new
    path (an action, a scope, a parameter) cannot slip past one of them."""
    if step.kernel:
        # The kernel fires the arm later, at a fork no one re-checks, and nothing journals it.
        return f"a kernel arm ({step.action} at the next fork)"
    sig = getattr(step.params, "signal", None)
    if sig in ("SIGKILL", "SIGTERM"):
        return f"{step.action} with {sig}"
    if step.action not in NEVER_ENDS:
        return step.action  # kill, terminate (SIGKILL after its grace), anything unknown
    return None


def changes_process(step: Step) -> bool:
    """Whether running ``step`` changes the process at all (every action but notify)."""
    return step.action != "notify"


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
        return self.why(subject.pid, subject.is_kernel_thread, subject.exe)

    def why(self, pid: int, is_kernel_thread: bool, exe: str | None) -> str | None:
        """The same test on bare facts: actions that reach beyond the offender (its tree, its
        cgroup) apply it to every process they would touch."""
        if pid <= 1:
            return "pid 1 (init)"
        if is_kernel_thread:
            return "kernel thread"
        if pid == self.agent_pid:
            return "the agent itself"
        if pid in self.agent_ancestors:
            return "an ancestor of the agent"
        if exe is not None and exe in self.exes:
            return f"protected executable {exe}"
        return None


@dataclass
class _Acted:
    at: float
    offender: tuple[int, int]
    exe: str | None
    cgroup: str


class Breakers:
    """The blast-radius breaker of every policy.

    A policy about to act on one more distinct offender, executable or cgroup than its
    breaker allows within the breaker's window is demoted to monitor mode instead: it keeps
    deciding and auditing ("would …"), and acts no more until the policy set is reloaded.
    Only enforced actions count; dry-run and monitor decisions never trip it.
    """

    def __init__(self) -> None:
        self._acted: dict[str, deque[_Acted]] = {}
        self._demoted: dict[str, str] = {}

    def demoted(self, policy: str) -> str | None:
        """Why ``policy`` is demoted, or None."""
        return self._demoted.get(policy)

    def check(self, policy: Policy, subject: Subject, now: float) -> str | None:
        """Trip (and return why) if acting on ``subject`` now would exceed the breaker."""
        breaker = policy.breaker
        acted = self._acted.setdefault(policy.name, deque())
        while acted and now - acted[0].at >= breaker.per_s:
            acted.popleft()
        candidate = _Acted(now, subject.key, subject.exe, subject.cgroup)
        window = [*acted, candidate]
        for what, distinct in (
            ("offenders", {a.offender for a in window}),
            ("executables", {a.exe for a in window}),
            ("cgroups", {a.cgroup for a in window}),
        ):
            if len(distinct) > breaker.max_offenders:
                reason = (
                    f"breaker: acting on pid {subject.pid} would make {len(distinct)} distinct "
                    f"{what} in {breaker.per_s:g} s (max {breaker.max_offenders}); "
                    "demoted to monitor until the policies are reloaded"
                )
                self._demoted[policy.name] = reason
                return reason
        return None

    def record(self, policy: Policy, subject: Subject, now: float) -> None:
        """Count an enforced action."""
        acted = self._acted.setdefault(policy.name, deque())
        acted.append(_Acted(now, subject.key, subject.exe, subject.cgroup))

    def reset(self, policy: str) -> None:
        """A reloaded policy starts undemoted (its action history is kept)."""
        self._demoted.pop(policy, None)
