"""The in-kernel fast path (issue 5): the kernel itself signals a forking offender.

Two triggers, both evaluated in ``sched:sched_process_fork`` (the sched section of
``bpf/remedy.bpf.c``), so the reaction costs no user-space round trip:

- ``arm(tgid, birth, signal)``: the next fork of that process is signalled (bpf_send_signal
  signals the forking process itself: SIGKILL kills it, SIGSTOP stops it). The arm holds the
  process's birth: another process that later holds the pid is never hit, and the kernel
  deletes the arm when the process dies (``disarm`` deletes it on release).
- policy mode (issue 12): a fork_rate tier with ``fastpath`` (a policy's ``kernel:``, compiled
  into the plan) makes the kernel signal every fork at or over that tier, within its cgroup
  scope and sustain, with the tier's dry run. It is configured with the plan
  (``KernelSensor.configure``), not here.

Protected tgids (``protect``; ``default_protected()`` is the agent, its ancestors and pid 1)
are never signalled; dry run counts "would have" and signals nothing. Both are enforced in the
kernel. Counters are per CPU, summed by ``counters()``.
"""

from __future__ import annotations

import ctypes
import enum
import os
import signal as signals
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from remedy.errors import ActionError, SensorError
from remedy.sensors import bpf
from remedy.sensors.kernel import KernelSensor

__all__ = ["ArmC", "FastPath", "FastPathCounter", "default_protected"]


class FastPathCounter(enum.IntEnum):
    """Indexes of ``fastpath_counters``; KEEP IN SYNC with enum fastpath_counter."""

    ARMED_HITS = 0
    THRESHOLD_HITS = 1
    SIGNALS_SENT = 2
    SEND_FAILED = 3
    DRY_RUN = 4
    PROTECTED = 5
    STALE = 6
    DISARMED_AT_EXIT = 7


class ArmC(ctypes.Structure):
    """Mirror of struct fastpath_arm (KEEP IN SYNC with bpf/remedy.bpf.c)."""

    _fields_ = (
        ("signal", ctypes.c_uint32),
        ("dry_run", ctypes.c_uint32),
        ("birth_ns", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
    )


def default_protected(proc: Path = Path("/proc")) -> set[int]:
    """This process, its ancestors and pid 1: never signalled by the fast path."""
    tgids = {1}
    pid = os.getpid()
    while pid > 1 and pid not in tgids:
        tgids.add(pid)
        try:
            stat = (proc / str(pid) / "stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return tgids


class FastPath:
    """User-space face of the fast-path maps of a started ``KernelSensor``, whose sched section
    (a fork signal) must be loaded. Not thread-safe, like the sensor."""

    def __init__(self, sensor: KernelSensor) -> None:
        if "sched" not in sensor.sections:
            raise SensorError("the fast path needs the sched section: enable fork_rate")
        self.sensor = sensor

    def _map(self, name: str) -> Any:
        return self.sensor.table(name)

    def arm(self, tgid: int, birth_ns: int, signal: int, dry_run: bool) -> None:
        """Signal the next fork of the process (``tgid``, born at ``birth_ns``), and each
        further one until it dies or is disarmed. Raises :class:`ActionError` when the birth
        is unknown or the arm map is full: a refusal the engine audits, never a crash."""
        _check_signal(signal)
        if birth_ns <= 0:
            raise ActionError("cannot arm: the offender's birth is unknown", pid=tgid)
        arm = ArmC(signal=signal, dry_run=int(dry_run), birth_ns=birth_ns, hits=0)
        try:
            self._map("fastpath_armed")[ctypes.c_uint32(tgid)] = arm
        except Exception as err:  # bcc raises bare Exception on a failed update (E2BIG: full)
            raise ActionError(f"cannot arm the in-kernel fast path: {err}", pid=tgid) from err

    def armed(self) -> dict[int, int]:
        """tgid -> birth of every live arm."""
        return {int(k.value): int(v.birth_ns) for k, v in self._map("fastpath_armed").items()}

    def disarm(self, tgid: int, birth_ns: int | None = None) -> bool:
        """Forget the arm of ``tgid`` (only if it holds ``birth_ns``, when given); True when
        one was removed."""
        table = self._map("fastpath_armed")
        key = ctypes.c_uint32(tgid)
        try:
            if birth_ns is not None and int(table[key].birth_ns) != birth_ns:
                return False
            del table[key]
        except KeyError:
            return False
        return True

    def hits(self, tgid: int) -> int | None:
        """Forks of an armed ``tgid`` seen since it was armed, or None when not armed."""
        try:
            return int(self._map("fastpath_armed")[ctypes.c_uint32(tgid)].hits)
        except KeyError:
            return None

    def protect(self, tgids: Iterable[int]) -> None:
        """Add ``tgids`` to the set the fast path never signals."""
        table = self._map("fastpath_protected")
        for tgid in tgids:
            table[ctypes.c_uint32(tgid)] = ctypes.c_uint8(1)

    def disable(self) -> None:
        """Every arm removed (protection stays). Policy-mode tiers go with the plan."""
        self._map("fastpath_armed").clear()

    def counters(self) -> dict[str, int]:
        """Summed per-CPU counters by name (armed_hits, signals_sent, …)."""
        sums = bpf.percpu_sums(self._map("fastpath_counters"), len(FastPathCounter))
        return {c.name.lower(): sums[c] for c in FastPathCounter}

    def layout_types(self) -> Any:
        """bcc's own ctypes type of the arm struct, to check the mirror."""
        return self._map("fastpath_armed").Leaf


def _check_signal(signal: int) -> None:
    if signal not in (signals.SIGKILL, signals.SIGSTOP, signals.SIGTERM):
        raise SensorError(f"fast path signal {signal} not allowed: SIGKILL, SIGSTOP or SIGTERM")
