"""Which boot this is and how long it has been up: the clock a TTL is measured on.

A TTL is a duration, so it is judged on ``CLOCK_BOOTTIME`` (monotonic, counts suspend) within
the boot that made it: a wall-clock step (NTP, an operator's ``date -s``) neither extends nor
cuts it. ``CLOCK_BOOTTIME`` restarts at every boot, so each record also carries the boot id
(``/proc/sys/kernel/random/boot_id``, a random UUID the kernel makes at boot): a record made in
another boot is not compared at all, its change went with the reboot (cgroups live in memory,
stopped processes are gone). See docs/undo.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from remedy.clock import Clock, SystemClock

__all__ = ["Boot", "FakeBoot", "NoBoot", "Now", "SystemBoot", "boot_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Now:
    """The present on every clock a TTL or a retry delay is judged on."""

    wall: float
    boot_id: str  # "" when the boot is unknown: then only wall time can be used
    boottime: float  # CLOCK_BOOTTIME seconds; meaningful only with a boot id


class Boot(Protocol):
    """The boot id and CLOCK_BOOTTIME, injected so that tests can step clocks and reboot."""

    def boot_id(self) -> str:
        """This boot's id, or "" when it cannot be known."""
        ...

    def boottime(self) -> float:
        """Seconds since this boot, suspend included; never goes back within a boot."""
        ...


class SystemBoot:
    """The running kernel's boot id (read once: it cannot change under a live process) and
    ``clock_gettime(CLOCK_BOOTTIME)``."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._path = proc_root / "sys" / "kernel" / "random" / "boot_id"
        self._id: str | None = None

    def boot_id(self) -> str:
        if self._id is None:
            try:
                self._id = self._path.read_text().strip()
            except OSError as err:
                # Without it records fall back to wall time, as records from before boot ids.
                log.warning("cannot read %s, TTLs use wall time: %s", self._path, err)
                self._id = ""
        return self._id

    def boottime(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)


class NoBoot:
    """No boot known: every TTL is judged on wall time. What a fake clock gets by default, so
    that tests that only move a :class:`~remedy.clock.FakeClock` see TTLs expire."""

    def boot_id(self) -> str:
        return ""

    def boottime(self) -> float:
        return 0.0


class FakeBoot:
    """A boot for tests: CLOCK_BOOTTIME is ``clock``'s monotonic time, so advancing the fake
    clock advances it while stepping its wall offset does not; :meth:`reboot` changes the id."""

    def __init__(self, clock: Clock, boot_id: str = "boot-1") -> None:
        self._clock = clock
        self.id = boot_id

    def boot_id(self) -> str:
        return self.id

    def boottime(self) -> float:
        return self._clock.monotonic()

    def reboot(self, boot_id: str) -> None:
        self.id = boot_id


def boot_for(clock: Clock) -> Boot:
    """The boot that goes with ``clock``: the system's for the system clock, none otherwise."""
    return SystemBoot() if isinstance(clock, SystemClock) else NoBoot()
