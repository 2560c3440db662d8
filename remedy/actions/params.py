"""Parameters of each action, validated when a playbook is loaded (never in the hot path).

Each action name used in a playbook maps to one pydantic model here; unknown keys are errors.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])i?)?B?\s*$", re.IGNORECASE)


def parse_bytes(value: object) -> int:
    """Bytes from an int or a string like "512Mi", "2Gi", "1G" (powers of 1024 either way)."""
    if isinstance(value, bool):
        raise ValueError("expected bytes or a size like '512Mi'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    raise ValueError(f"expected bytes or a size like '512Mi' or '2Gi', got {value!r}")


class ThrottleCpuParams(ActionParams):
    """Cap CPU at ``cpu`` cores (cpu.max / the CFS quota)."""

    cpu: float = Field(gt=0.0, le=1024.0)


class LimitMemoryParams(ActionParams):
    """Hold memory at ``high`` bytes: v2 memory.high (reclaim and throttle above it), plus
    memory.max at ``max`` when given; v1 memory.soft_limit_in_bytes at ``high`` and the hard
    memory.limit_in_bytes at ``max``, or at ``high`` without one (v1 has nothing else that
    stops a grower)."""

    high: int = Field(ge=4096)
    max: int | None = Field(default=None, ge=4096)

    @field_validator("high", "max", mode="before")
    @classmethod
    def _size(cls, value: object) -> int | None:
        return None if value is None else parse_bytes(value)

    @model_validator(mode="after")
    def _max_above_high(self) -> LimitMemoryParams:
        if self.max is not None and self.max < self.high:
            raise ValueError(f"max ({self.max}) must not be below high ({self.high})")
        return self


class LimitPidsParams(ActionParams):
    """Cap the number of tasks at ``max`` (pids.max): further forks fail with EAGAIN."""

    max: int = Field(ge=1, le=4_194_304)


class FreezeParams(ActionParams):
    """Freeze every task of the target cgroup (v2 cgroup.freeze, v1 freezer.state)."""


class ThawParams(ActionParams):
    """Thaw the target cgroup."""


class IoWeightParams(ActionParams):
    """Proportional IO weight (v2 io.weight 1..10000; v1 blkio.weight, clamped to 10..1000)."""

    weight: int = Field(ge=1, le=10_000)


class NotifyParams(ActionParams):
    """Do nothing but audit and alert with ``message``."""

    message: str = ""


class ReniceParams(ActionParams):
    """Set the nice value of every thread of each target."""

    nice: int = Field(ge=-20, le=19)


class IoniceParams(ActionParams):
    """Set the IO scheduling class (and level within best-effort) of each target."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    io_class: Literal["idle", "best-effort"] = Field(alias="class")
    level: int = Field(default=4, ge=0, le=7)


class StopParams(ActionParams):
    """SIGSTOP each target through a pidfd."""


class ContinueParams(ActionParams):
    """SIGCONT each target through a pidfd."""


class TerminateParams(ActionParams):
    """SIGTERM each target, wait up to ``grace_s`` for it to exit, then SIGKILL."""

    grace_s: float = Field(default=5.0, ge=0.0, le=300.0)


PARAMS: dict[str, type[ActionParams]] = {
    "quarantine": QuarantineParams,
    "kill": KillParams,
    "throttle_cpu": ThrottleCpuParams,
    "limit_memory": LimitMemoryParams,
    "limit_pids": LimitPidsParams,
    "freeze": FreezeParams,
    "thaw": ThawParams,
    "io_weight": IoWeightParams,
    "notify": NotifyParams,
    "renice": ReniceParams,
    "ionice": IoniceParams,
    "stop": StopParams,
    "continue": ContinueParams,
    "terminate": TerminateParams,
}
