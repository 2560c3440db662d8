"""Domain errors. OS errors are translated into these once, at the boundary, and carry context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class RemedyError(Exception):
    """Base of every error remedy raises on purpose."""


@dataclass(frozen=True)
class ConfigError:
    """One problem in one policy or playbook file, located by file, key path and line."""

    file: Path
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class ConfigErrors(RemedyError):
    """A configuration was rejected as a whole; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class SensorError(RemedyError):
    """A kernel sensor could not be compiled, loaded or attached; the message names the hook."""


class ActionError(RemedyError):
    """An action failed. ``outcome`` is the short word written to the audit log."""

    outcome = "error"

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        cgroup: str | None = None,
        policy: str | None = None,
    ) -> None:
        self.pid = pid
        self.cgroup = cgroup
        self.policy = policy
        parts = [message]
        if pid is not None:
            parts.append(f"pid={pid}")
        if cgroup is not None:
            parts.append(f"cgroup={cgroup}")
        if policy is not None:
            parts.append(f"policy={policy}")
        super().__init__(" ".join(parts))


class ProcessGone(ActionError):
    """The process exited (or its pid was reused) before we could act: an outcome, not a crash."""

    outcome = "gone"


class IdentityUnverified(ActionError):
    """A record could not be bound to a process with certainty (its birth unknown, or not in
    the kernel's births): refused rather than guessed."""

    outcome = "unverified"


class PermissionDenied(ActionError):
    """The kernel refused the action."""

    outcome = "denied"


class CgroupError(ActionError):
    """A cgroup could not be created, written, or removed."""

    outcome = "cgroup-error"


class ProtectedProcess(ActionError):
    """The target is protected (pid 1, a kernel thread, the agent or its ancestors)."""

    outcome = "protected"
