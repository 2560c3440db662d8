"""What every action gets: where cgroups and processes are, and where quarantines go."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.params import ActionParams
from remedy.engine.offender import Subject
from remedy.errors import ActionError
from remedy.proc import ProcessInfo, ProcFS


@dataclass(frozen=True)
class ActionContext:
    """Injected roots: tests point these at fixture trees or a test's own cgroup."""

    cgroups: CgroupDriver
    procfs: ProcFS
    quarantine_root: str = "/remedy"
    scope: str = "process"  # the policy's scope, set per step by the executor
    # Why a process an action would reach must be spared (the engine's protector), or None.
    spare: Callable[[ProcessInfo], str | None] = lambda _info: None

    def quarantine_of(self, subject: Subject) -> str:
        """One quarantine per offender identity, so a reused pid never shares one."""
        return f"{self.quarantine_root.rstrip('/')}/q-{subject.pid}-{subject.start_ticks}"

    def reach(self, subject: Subject, started_before_ns: int) -> list[int]:
        """Every pid the action reaches beyond the offender itself, protected ones left out:
        its descendants (scope tree) or the other members of its cgroup (scope cgroup).
        Processes that started after ``started_before_ns`` are not ones we decided about."""
        if self.scope == "cgroup":
            candidates = self.cgroups.members(subject.cgroup)
        elif self.scope == "tree":
            candidates = self._descendants(subject.pid)
        else:
            return []
        reached = []
        for pid in candidates:
            if pid == subject.pid:
                continue
            try:
                info = self.procfs.read(pid)
            except ActionError:
                continue
            if self.procfs.start_boot_ns(info) > started_before_ns or self.spare(info):
                continue
            reached.append(pid)
        return reached

    def _descendants(self, root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid in self.procfs.pids():
            try:
                children.setdefault(self.procfs.read(pid).ppid, []).append(pid)
            except ActionError:
                continue
        found, todo = [], [root]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found


class Action(Protocol):
    """A playbook step's implementation. Guards, dry-run and cooldowns belong to the engine."""

    name: str

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        """What running it would do, in words ("quarantine pid 42 (x) into ...")."""
        ...

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        """Do it; return details for the audit line; raise ActionError subclasses on failure."""
        ...
