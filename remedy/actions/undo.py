"""Undo records: what a reversible action changed, written to the journal before it is applied.

Shared contract between the actions (which capture previous values), the journal (which makes
them durable) and the engine (which reverts them on TTL, recovery, policy removal or shutdown).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class UndoRecord:
    """One applied change and how to take it back."""

    id: str  # unique (uuid4 hex)
    action: str  # the action that made the change, e.g. "throttle_cpu"
    policy: str
    pid: int
    start_ticks: int
    cgroup: str  # the cgroup written to (relative path, "/a/b")
    created: float  # wall-clock seconds
    expires: float  # wall-clock seconds: reverted at the latest then (the TTL)
    # knob -> previous value as the driver reported it (e.g. {"cpu_cores": "max"})
    previous: dict[str, str] = field(default_factory=dict)
    original_cgroup: str | None = None  # where the process was before a move, if it was moved
    pids: tuple[int, ...] = ()  # processes moved or signalled (stop -> continue on revert)
    # For a move: str(pid) -> {hierarchy: path} where each moved process came from, per v1
    # hierarchy ("pids", "cpu", "memory", "freezer", "blkio" may all differ) or {"": path} on
    # v2. Records written before it have only original_cgroup, replayed in every hierarchy.
    origins: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["pids"] = list(self.pids)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UndoRecord:
        origins = {
            str(pid): {str(h): str(path) for h, path in where.items()}
            for pid, where in dict(data.get("origins") or {}).items()
        }
        return cls(**{**data, "pids": tuple(data.get("pids", ())), "origins": origins})
