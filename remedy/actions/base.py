"""What every action gets: where cgroups and processes are, and where quarantines go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from remedy.actions.cgroups import CgroupDriver
from remedy.actions.params import ActionParams
from remedy.engine.offender import Subject
from remedy.proc import ProcFS


@dataclass(frozen=True)
class ActionContext:
    """Injected roots: tests point these at fixture trees or a test's own cgroup."""

    cgroups: CgroupDriver
    procfs: ProcFS
    quarantine_root: str = "/remedy"

    def quarantine_of(self, subject: Subject) -> str:
        """One quarantine per offender identity, so a reused pid never shares one."""
        return f"{self.quarantine_root.rstrip('/')}/q-{subject.pid}-{subject.start_ticks}"


class Action(Protocol):
    """A playbook step's implementation. Guards, dry-run and cooldowns belong to the engine."""

    name: str

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        """What running it would do, in words ("quarantine pid 42 (x) into ...")."""
        ...

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        """Do it; return details for the audit line; raise ActionError subclasses on failure."""
        ...
