"""Undo records: what a reversible action changed, written to the journal before it is applied.

Shared contract between the actions (which capture previous values), the journal (which makes
them durable) and the engine (which reverts them on TTL, recovery, policy removal or shutdown).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from remedy.actions.boot import Now


@dataclass(frozen=True)
class UndoRecord:
    """One applied change and how to take it back."""

    id: str  # unique (uuid4 hex)
    action: str  # the action that made the change, e.g. "throttle_cpu"
    policy: str
    pid: int
    start_ticks: int
    cgroup: str  # the cgroup written to (relative path, "/a/b")
    created: float  # wall-clock seconds (for humans, and the TTL of records without a boot)
    expires: float  # wall-clock seconds: created + the TTL
    # knob -> previous value as the driver reported it (e.g. {"cpu_cores": "max"})
    previous: dict[str, str] = field(default_factory=dict)
    original_cgroup: str | None = None  # where the process was before a move, if it was moved
    pids: tuple[int, ...] = ()  # processes moved or signalled (stop -> continue on revert)
    # For a move: str(pid) -> {hierarchy: path} where each moved process came from, per v1
    # hierarchy ("pids", "cpu", "memory", "freezer", "blkio" may all differ) or {"": path} on
    # v2. Records written before it have only original_cgroup, replayed in every hierarchy.
    origins: dict[str, dict[str, str]] = field(default_factory=dict)
    # The boot that made it and CLOCK_BOOTTIME then, stamped by the journal: the TTL runs on
    # that clock within that boot. Records written before them have neither: wall time.
    boot_id: str = ""
    boottime: float | None = None

    @property
    def ttl_s(self) -> float:
        """How long the change may stay, from its creation."""
        return self.expires - self.created

    def other_boot(self, now: Now) -> bool:
        """Made in a boot that is not this one: the change went with the reboot."""
        return bool(self.boot_id and now.boot_id and self.boot_id != now.boot_id)

    def expired(self, now: Now) -> bool:
        """Past its TTL: on CLOCK_BOOTTIME when made in this boot, so a wall-clock step
        neither extends nor cuts it; on wall time for a record without a boot id (or when
        this boot is unknown). See :meth:`other_boot` for records from another boot."""
        if self.boot_id and self.boot_id == now.boot_id and self.boottime is not None:
            return now.boottime >= self.boottime + self.ttl_s
        return now.wall >= self.expires

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
