"""Starting a sensor and identifying what it reports: shared by the agent and ``remedy record``
(a tool beside the daemon, which must not import it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from remedy.actions.cgroups import CgroupDriver
from remedy.errors import SensorError
from remedy.policy import PolicySet
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS, Sensor, SignalCounters, SignalSettings
from remedy.sensors.context import CgroupIndex, Enricher, ParentChain, PodIndex
from remedy.sensors.identify import ProcIdentifier
from remedy.sensors.kernel import KernelSensor, Sizes
from remedy.sensors.records import SensorRecord

__all__ = [
    "STACK_FRAMES",
    "LossWatch",
    "SensorChoice",
    "identifier_for",
    "signal_settings",
    "start_sensor",
    "watched",
]

SensorChoice = Literal["auto", "kernel", "sampler"]
STACK_FRAMES = 8


def _stack_reader(sensor: KernelSensor) -> Callable[[SensorRecord], tuple[str, ...]]:
    """Symbolized frames for a record: kernel frames, then the offender's user frames."""

    def frames(record: SensorRecord) -> tuple[str, ...]:
        kernel = sensor.stack(record.kstack_id)[:STACK_FRAMES]
        user = sensor.stack(record.ustack_id, user_pid=record.tgid)[:STACK_FRAMES]
        return (*kernel, *(f"user: {f}" for f in user))

    return frames


def start_sensor(
    settings: Mapping[str, SignalSettings],
    choice: SensorChoice,
    *,
    ringbuf_pages: int = 16,
    naive: bool = False,
    say: Callable[[str], None] = print,
) -> Sensor:
    """The kernel funnel; with ``auto``, the /proc sampler when the kernel path cannot load,
    said loudly. Shared by the agent and ``remedy record``."""
    if choice != "sampler":
        kernel = KernelSensor(Sizes(ringbuf_pages=ringbuf_pages), naive=naive)
        try:
            kernel.start(settings)
            return kernel
        except SensorError as err:
            if choice == "kernel":
                raise
            say(
                f"WARNING: kernel sensors unavailable ({err}); falling back to sampling "
                "/proc: lower fidelity (short-lived processes and sub-interval bursts missed)"
            )
    from remedy.sensors.sampler import ProcSampler  # noqa: PLC0415

    sampler = ProcSampler()
    sampler.start(settings)
    return sampler


def identifier_for(
    sensor: Sensor, procfs: ProcFS, cgroups: CgroupDriver, cgroup_root: Path
) -> ProcIdentifier:
    """Identification with context: /proc, the cgroup index, and (from the kernel sensor) the
    lineage map for exited parents and symbolized stacks. Shared by the agent and the recorder."""
    kernel = sensor if isinstance(sensor, KernelSensor) else None
    enricher = Enricher(
        procfs,
        CgroupIndex.detect(cgroup_root),
        # The kernel's lineage map remembers parents that already exited.
        ParentChain(procfs, kernel.lineage if kernel else lambda _pid: None),
        proc_cgroup=cgroups.cgroup_of,
        pods=PodIndex(),  # namespace/name from the kubelet's /var/log/pods, where it exists
    )
    return ProcIdentifier(
        procfs, cgroups, enricher, _stack_reader(kernel) if kernel else None, births=kernel
    )


def watched(settings: Mapping[str, SignalSettings]) -> str:
    """ "fork_rate ≥ 200 forks per 1 s, …" for ready lines."""
    return ", ".join(
        f"{name} ≥ {s.threshold:,} {SIGNALS[name].noun} per {s.window_s:g} s"
        for name, s in sorted(settings.items())
    )


def signal_settings(policies: PolicySet) -> dict[str, SignalSettings]:
    """What the sensor must watch: one entry per signal a policy uses."""
    return {
        p.signal: SignalSettings(p.window_s, p.threshold, p.sustain, p.lifetime_s)
        for p in policies.policies
    }


class LossWatch:
    """Marks records degraded after any loss: the ring buffer was full, the window map refused a
    key, or the queue dropped a record. A loss taints its signal (the queue: every signal) for
    two windows, the longest a lost record's window can still be open."""

    def __init__(self, settings: Mapping[str, SignalSettings]) -> None:
        self._settings = dict(settings)
        self._last: dict[str, int] = {}
        self._last_queue_full = 0
        self._until: dict[str, float] = {}

    def update(self, counters: Mapping[str, SignalCounters], queue_full: int, now: float) -> None:
        for name, s in self._settings.items():
            c = counters.get(name)
            lost = c.ringbuf_failed + c.key_init_failed if c else 0
            if lost > self._last.get(name, 0) or queue_full > self._last_queue_full:
                self._until[name] = now + 2 * s.window_s
            self._last[name] = lost
        self._last_queue_full = queue_full

    def reconfigure(self, settings: Mapping[str, SignalSettings]) -> None:
        self._settings = dict(settings)

    def mark(self, record: SensorRecord, now: float) -> SensorRecord:
        if not record.degraded and now < self._until.get(record.signal, 0.0):
            return dataclasses.replace(record, degraded=True)
        return record
