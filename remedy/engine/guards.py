"""Guards the engine applies before any action: rate limits, protected processes, and what a
step can do to a process (end it, or merely change it).

The engine owns these, not the actions, so no action can forget them (oomd's lesson).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from remedy.engine.offender import Member, Subject
from remedy.errors import RemedyError
from remedy.policy.model import Policy, PolicySet, Step
from remedy.proc import ProcessInfo, ProcFS

log = logging.getLogger(__name__)

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
        # not limit_memory: a hard limit (v1 memory.limit_in_bytes, v2 memory.max) below what
        # the process uses is an OOM kill
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


# Who may own a protected executable's process when its entry names no user.
ROOT_ONLY: frozenset[int] = frozenset({0})

# proc_exe_link() prints the file's path with d_path(), which appends this once the file is
# unlinked: a daemon whose package was upgraded runs "/usr/sbin/sshd (deleted)".
_DELETED = " (deleted)"


@dataclass(frozen=True)
class Protector:
    """Decides which processes remedy never touches.

    Beyond pid 1, kernel threads, the agent and its ancestors, a process is protected by its
    executable only when nobody but the executable's owner can have made it what it is (see
    SECURITY.md, "What remedy will never act on"): its exe is a protected path, in directories
    only root (or the entry's user) can write; every one of its uids is root, or the user its
    entry names; no login session of anyone else started it (the audit login uid); and its
    environment told the dynamic loader to load nothing else (:data:`remedy.proc.LOADER_ENV`).
    """

    agent_pid: int
    agent_ancestors: frozenset[int]
    exes: frozenset[str] = PROTECTED_EXES
    # Who may own each protected path's process; a path missing here: root only.
    owners: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # Where the uids, login uid and environment are read. None only where the processes are
    # not on this host (replay): then the recorded exe and real uid are all there is.
    procfs: ProcFS | None = None
    # The start time of each ancestor when the agent started: an ancestor that exits (the
    # shell or sudo a manually started agent came from) frees its pid, and the next holder of
    # that number is a stranger, not an ancestor. An ancestor missing here: by pid alone.
    ancestor_ticks: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def for_this_agent(
        cls, procfs: ProcFS, agent_pid: int, extra_exes: Iterable[str] = ()
    ) -> Protector:
        """Protect this agent, its ancestors (whoever started it) and the well-known daemons."""
        try:
            chain = procfs.ancestors(agent_pid)
        except RemedyError:
            chain = []
        ancestors = frozenset(p.pid for p in chain) or frozenset({1})
        return cls(
            agent_pid,
            ancestors,
            PROTECTED_EXES | frozenset(extra_exes),
            procfs=procfs,
            ancestor_ticks={p.pid: p.start_ticks for p in chain},
        )

    def extended(self, policies: PolicySet) -> Protector:
        """This protector with the configuration's Protection documents added (never removed):
        a path both here and there may be owned by the users of either."""
        owners = dict(self.owners)
        for path in policies.protected_exes:
            theirs = policies.protected_owners.get(path, ROOT_ONLY)
            owners[path] = self.owners_of(path) | theirs if path in self.exes else theirs
        return replace(self, exes=self.exes | policies.protected_exes, owners=owners)

    def owners_of(self, path: str) -> frozenset[int]:
        """The uids a process of protected ``path`` may run as to be protected."""
        return self.owners.get(path, ROOT_ONLY)

    def why_protected(self, subject: Subject) -> str | None:
        """A reason when ``subject`` must not be acted on, else None."""
        return self._why(
            subject.pid, subject.start_ticks, subject.is_kernel_thread, subject.exe, subject.uid
        )

    def why_member(self, member: Member) -> str | None:
        """The same test on a cgroup offender's member, as identification read it."""
        return self._why(
            member.pid, member.start_ticks, member.is_kernel_thread, member.exe, member.uid
        )

    def why(self, info: ProcessInfo) -> str | None:
        """The same test on a process read from /proc: actions that reach beyond the offender
        (its tree, its cgroup) apply it to every process they would touch."""
        return self._why(info.pid, info.start_ticks, info.is_kernel_thread, info.exe, info.uid)

    def _why(
        self, pid: int, start_ticks: int, is_kernel_thread: bool, exe: str | None, uid: int
    ) -> str | None:
        if pid <= 1:
            return "pid 1 (init)"
        if is_kernel_thread:
            return "kernel thread"
        if pid == self.agent_pid:
            return "the agent itself"
        if pid in self.agent_ancestors and self.ancestor_ticks.get(pid, start_ticks) == start_ticks:
            return "an ancestor of the agent"
        path = self._protected_path(exe)
        if path is None:
            return None
        why_not = self._why_not(path, pid, start_ticks, uid)
        if why_not is not None:
            # Worth a line: an operator who protected this path may wonder why it was acted on.
            log.info("pid %d runs protected %s but is not protected: %s", pid, exe, why_not)
            return None
        if exe != path:
            return f"protected executable {path} (replaced on disk since it started)"
        return f"protected executable {path}"

    def _protected_path(self, exe: str | None) -> str | None:
        if exe is None:
            return None
        if exe in self.exes:
            return exe
        # The running file was unlinked (an upgrade renames the new one over it): the name is
        # the one it last had, so it is compared as that, under the same directory rule.
        if exe.endswith(_DELETED) and exe[: -len(_DELETED)] in self.exes:
            return exe[: -len(_DELETED)]
        return None

    def _why_not(self, path: str, pid: int, start_ticks: int, uid: int) -> str | None:
        """Why the process running protected ``path`` could be someone else's doing, or None."""
        owners = self.owners_of(path)
        if uid not in owners:
            return f"it runs as uid {uid}, not {_names(owners)}"
        if self.procfs is None:
            return None
        try:
            facts = self.procfs.provenance(pid, start_ticks)
        except RemedyError as err:
            return f"its uids, login uid and environment cannot be read ({err})"
        # The code: the file it runs (deleted or not) and the name it was found by must be
        # beyond the reach of anyone but root and the owners.
        if facts.exe_uid not in owners | ROOT_ONLY:
            return f"its executable file belongs to uid {facts.exe_uid}"
        if facts.exe_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return "its executable file is writable by others"
        writable = _writable_by_others(path, owners)
        if writable is not None:
            return writable
        if len(set(facts.uids)) != 1:
            # A setuid program run by a user: euid root, real uid the user's; or a root daemon
            # gone half way to another user.
            return f"its uids differ (real, effective, saved, fs: {facts.uids})"
        if facts.loginuid is not None and facts.loginuid != uid:
            # sudo, su and setuid programs keep the login uid of the session they ran in.
            return f"it was started in a login session of uid {facts.loginuid}"
        if facts.loader_env:
            return f"its environment loads other code ({', '.join(facts.loader_env)})"
        return None


def _names(uids: frozenset[int]) -> str:
    return " or ".join(str(u) for u in sorted(uids))


def _writable_by_others(path: str, owners: frozenset[int]) -> str | None:
    """Why someone other than root or ``owners`` could have given a file the name ``path``, or
    None. Every directory from / down to the file's, as written and as resolved (symlinks such
    as /lib -> usr/lib), must belong to root or an owner; the file's own directory must be
    writable by its owner only; the ones above may also be sticky (/tmp), because then nobody
    but root or an entry's owner can rename or remove what root made there (may_delete())."""
    trusted = owners | ROOT_ONLY
    parent = os.path.dirname(path)
    real_parent = os.path.realpath(parent)
    chains = (_prefixes(parent), _prefixes(real_parent))
    for chain in chains:
        for index, directory in enumerate(chain):
            try:
                st = os.stat(directory)
            except OSError as err:
                return f"cannot check {directory}: {err.strerror}"
            if st.st_uid not in trusted:
                return f"{directory} belongs to uid {st.st_uid}"
            others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            sticky_above = bool(st.st_mode & stat.S_ISVTX) and index < len(chain) - 1
            if others_write and not sticky_above:
                return f"{directory} is writable by others"
    return None


def _prefixes(directory: str) -> list[str]:
    """The directory and its ancestors, from the root: /usr/sbin: /, /usr, /usr/sbin."""
    parts = [p for p in directory.split("/") if p]
    return ["/", *("/" + "/".join(parts[: i + 1]) for i in range(len(parts)))]


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
