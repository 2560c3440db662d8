"""Parameters of each action, validated when a playbook is loaded (never in the hot path).

Each action name used in a playbook maps to one pydantic model here; unknown keys are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ActionParams(BaseModel):
    """Base of all action parameters: frozen, and unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class QuarantineParams(ActionParams):
    """Move the offender into its own cgroup capped at ``pids_max`` tasks and ``cpu`` cores."""

    pids_max: int = Field(default=32, ge=1, le=1_000_000)
    cpu: float = Field(default=0.2, gt=0.0, le=1024.0)


class KillParams(ActionParams):
    """Signal the offender through its pidfd; with ``quarantine`` also every member of its
    quarantine cgroup (children it forked before being caught)."""

    signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL"
    quarantine: bool = True


PARAMS: dict[str, type[ActionParams]] = {
    "quarantine": QuarantineParams,
    "kill": KillParams,
}
