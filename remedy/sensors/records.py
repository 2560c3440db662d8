"""What a kernel sensor hands to user space: one record per offender per window."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SensorRecord:
    """A key crossed its threshold inside its window. Decoded from the ring buffer."""

    signal: str  # e.g. "fork_rate"; matches Policy.signal
    tgid: int  # the offending process
    pid: int  # the thread that crossed
    ppid: int  # parent tgid as seen by the kernel (0 when unknown)
    comm: str
    cgroup_id: int
    count: int  # events counted in the window when the threshold was crossed
    window_s: float  # the configured window length
    elapsed_s: float  # time from the window's first event to the crossing
    ts_boot_ns: int  # CLOCK_BOOTTIME of the crossing; compared with process start times

    def describe(self, threshold: int) -> str:
        """Human wording, e.g. "200 forks in 0.08 s (≥ 200 per 1 s)"."""
        noun = {"fork_rate": "forks"}.get(self.signal, "events")
        return (
            f"{self.count:,} {noun} in {self.elapsed_s:.2f} s "
            f"(≥ {threshold:,} per {self.window_s:g} s)"
        )
