"""Shared by the kernel tests: run a bounded workload in the test's cgroup, collect records."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from remedy.compiler.plan import SensorPlan, SignalPlan, Tier, WindowClass
from remedy.sensors.catalog import SIGNALS, SignalSettings
from remedy.sensors.kernel import KernelSensor
from remedy.sensors.records import SensorRecord
from testkit.sandbox import CGROUP_ROOT, CgroupSandbox

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"


@dataclass
class Harness:
    """A started sensor whose records are collected in ``records`` on every ``drain()``."""

    sensor: KernelSensor
    records: list[SensorRecord] = field(default_factory=list)
    cgroup_ids: set[int] = field(default_factory=set)  # of the boxes workloads ran in

    def configure(self, **settings: SignalSettings) -> None:
        self.drain()
        self.records.clear()
        self.sensor.configure(plan_of(settings))

    def configure_plan(self, plan: SensorPlan) -> None:
        self.drain()
        self.records.clear()
        self.sensor.configure(plan)

    def drain(self) -> None:
        for _ in range(3):
            self.sensor.poll(30)

    def run(self, box: CgroupSandbox, mode: str, *args: str, timeout: float = 30) -> int:
        """Run ``storm.py mode args`` in ``box`` to completion; return its pid."""
        if box.has_cgroup_id:
            self.cgroup_ids.add(box.cgroup_id)
        proc = box.spawn([sys.executable, str(STORM), mode, *args])
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            self.sensor.poll(50)
        assert proc.wait(1) == 0
        self.drain()
        return proc.pid

    def of(self, signal: str, key: int) -> list[SensorRecord]:
        """Records of ``signal`` for ``key`` made by the test's own workloads: a host process
        that once held the same pid (pids wrap) is not one of ours."""
        return [
            r
            for r in self.records
            if r.signal == signal
            and r.key == key
            and (not self.cgroup_ids or r.cgroup_id in self.cgroup_ids)
        ]


def cgroup_key(sensor: KernelSensor, box: CgroupSandbox) -> int:
    """The key cgroup signals give ``box``: its directory's inode in the hierarchy the sensor
    keys by (cgroup2, or a v1 controller's: pids on hybrid hosts)."""
    if sensor.cgroup_keys == "cgroup2":
        return box.cgroup_id
    return (CGROUP_ROOT / sensor.cgroup_keys / box.name).stat().st_ino


def plan_of(settings: dict[str, SignalSettings], generation: int = 1) -> SensorPlan:
    """One everywhere tier per signal (rule = catalogue id + 1): the tests of one threshold
    per signal, written before tiers."""
    return SensorPlan(
        {
            name: SignalPlan(
                name,
                (
                    WindowClass(
                        0,
                        s.window_s,
                        (Tier(SIGNALS[name].id + 1, name, s.threshold, max(1, s.sustain)),),
                    ),
                ),
                lifetime_s=s.lifetime_s,
            )
            for name, s in settings.items()
        },
        generation,
    )


def start(
    sensor: KernelSensor, settings: dict[str, SignalSettings] | SensorPlan
) -> Iterator[Harness]:
    sensor.start(settings if isinstance(settings, SensorPlan) else plan_of(settings))
    harness = Harness(sensor)
    sensor.open_ring_buffer(harness.records.append)
    try:
        yield harness
    finally:
        sensor.close()
