"""Starting a sensor and identifying what it reports: shared by the agent and ``remedy record``
(a tool beside the daemon, which must not import it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from remedy.actions.cgroups import CgroupDriver
from remedy.compiler import SensorPlan
from remedy.engine.engine import Incidents
from remedy.errors import SensorError
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS, Sensor, SignalCounters, SignalSettings, needs_bpf
from remedy.sensors.context import CgroupIndex, Enricher, ParentChain, PodIndex
from remedy.sensors.identify import ProcIdentifier
from remedy.sensors.kernel import KernelSensor, Sizes
from remedy.sensors.records import SensorRecord

__all__ = [
    "STACK_FRAMES",
    "LossWatch",
    "SensorChoice",
    "bpf_plan",
    "configure_sensor",
    "identifier_for",
    "incidents_of",
    "legacy_settings",
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


def legacy_settings(plan: SensorPlan) -> dict[str, SignalSettings]:
    """Each signal's lowest tier as one threshold: what naive mode applies in user space and what
    a trace header records (records carry rule 0 there, and the engine gives a rule-0 record only
    to policies whose threshold it reaches)."""
    out: dict[str, SignalSettings] = {}
    for name, sp in plan.signals.items():
        cls, tier = min(sp.tiers(), key=lambda ct: (ct[1].threshold, ct[0].window_s))
        out[name] = SignalSettings(cls.window_s, tier.threshold, tier.sustain, sp.lifetime_s)
    return out


def bpf_plan(plan: SensorPlan) -> SensorPlan:
    """What the kernel sensor (or the sampler) watches: every signal but the pressure ones,
    which the PSI sensor serves (same rule ids and generation)."""
    return SensorPlan({n: sp for n, sp in plan.signals.items() if needs_bpf(n)}, plan.generation)


def configure_sensor(sensor: Sensor, plan: SensorPlan) -> None:
    """New tiers, thresholds and generation for a running sensor (a reload)."""
    sensor.configure(bpf_plan(plan))


def incidents_of(sensor: Sensor) -> Incidents:
    """What the engine holds and re-measures incidents through: the sensor itself."""
    return sensor


def start_sensor(
    plan: SensorPlan,
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
            kernel.start(bpf_plan(plan))
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
    sampler.start(bpf_plan(plan))
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


def watched(plan: SensorPlan) -> str:
    """ "fork_rate ≥ 200 forks per 1 s (fork-bomb), …" for ready lines: every tier."""
    return ", ".join(
        f"{name} ≥ {t.threshold:,} {SIGNALS[name].noun} per {c.window_s:g} s ({t.policy})"
        for name, sp in sorted(plan.signals.items())
        for c, t in sp.tiers()
    )


def longest_windows(plan: SensorPlan) -> dict[str, float]:
    """Each signal's longest window: how long a loss can taint its records."""
    return {name: max(c.window_s for c in sp.classes) for name, sp in plan.signals.items()}


class LossWatch:
    """Marks records degraded after any loss: the ring buffer was full, the window map refused a
    key, or the queue dropped a record. A loss taints its signal (the queue: every signal) for
    two windows, the longest a lost record's window can still be open."""

    def __init__(self, plan: SensorPlan) -> None:
        self._windows = longest_windows(plan)
        self._last: dict[str, int] = {}
        self._last_queue_full = 0
        self._until: dict[str, float] = {}

    def update(self, counters: Mapping[str, SignalCounters], queue_full: int, now: float) -> None:
        for name, window_s in self._windows.items():
            c = counters.get(name)
            lost = c.ringbuf_failed + c.key_init_failed if c else 0
            if lost > self._last.get(name, 0) or queue_full > self._last_queue_full:
                self._until[name] = now + 2 * window_s
            self._last[name] = lost
        self._last_queue_full = queue_full

    def reconfigure(self, plan: SensorPlan) -> None:
        self._windows = longest_windows(plan)

    def mark(self, record: SensorRecord, now: float) -> SensorRecord:
        if not record.degraded and now < self._until.get(record.signal, 0.0):
            return dataclasses.replace(record, degraded=True)
        return record
