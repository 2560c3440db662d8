"""What a sensor hands to user space: one record per key per window."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SensorRecord:
    """A key crossed its threshold inside its window. Decoded from the ring buffer (or made by
    the /proc sampler, with ``sampled`` set)."""

    signal: str  # a catalogue name, e.g. "fork_rate"; matches Policy.signal
    tgid: int  # the process whose event crossed the threshold
    pid: int  # its thread
    ppid: int  # parent tgid as the kernel saw it (0 when unknown)
    comm: str
    cgroup_id: int
    count: int  # the window's value at the crossing, in the signal's unit
    window_s: float  # the configured window length
    elapsed_s: float  # time from the window's start to the crossing
    ts_boot_ns: int  # CLOCK_BOOTTIME of the crossing; compared with process start times
    key: int = 0  # what was aggregated: tgid, parent tgid or cgroup id (see the catalogue)
    # Births (CLOCK_BOOTTIME ns of the process's start, as task->start_boottime): with the tgid,
    # the identity of a process. birth_ns is tgid's; key_birth_ns is the birth of the process
    # ``key`` names (the parent's for parent-keyed signals), 0 for cgroup keys and for unknown.
    birth_ns: int = 0
    key_birth_ns: int = 0
    degraded: bool = False  # records were lost around this window: never escalate to a kill
    kstack_id: int = -1  # ids in the sensor's stack map; -1 when none
    ustack_id: int = -1
    sampled: bool = False  # from the /proc sampler: lower timing precision
    # The tier that crossed (remedy.compiler.plan.Tier.rule; 0: none) and the plan generation
    # it was written with: the engine routes by these, so a record in flight across a reload
    # reaches the policy that produced it.
    rule: int = 0
    generation: int = 0

    def describe(self, threshold: int, noun: str = "events") -> str:
        """Human wording, e.g. "200 forks in 0.08 s (≥ 200 per 1 s)"."""
        return (
            f"{self.count:,} {noun} in {self.elapsed_s:.2f} s "
            f"(≥ {threshold:,} per {self.window_s:g} s)"
            + (" [degraded: records were lost]" if self.degraded else "")
        )
