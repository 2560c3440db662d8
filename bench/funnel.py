"""The funnel against the naive agent, side by side on the same fork storm, in one run.

For each mode the same bounded storm (stress-ng's fork stressor, inside a pids-limited cgroup)
runs while the agent watches in dry-run: ``none`` (no agent) is the storm's own cost; ``funnel``
counts in the kernel and lets one record per offender per window cross; ``naive`` is the same
agent with every fork crossing to user space and counted in Python. Modes are interleaved over
several rounds and the median is reported, because a 2-core VM is noisy.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "funnel", "naive")


@dataclass
class Run:
    mode: str
    storm_s: float
    stats: dict[str, Any]

    @property
    def watch_cpu_s(self) -> float:
        """Agent CPU spent watching, start-up (compiling the program) excluded."""
        return float(self.stats["cpu_s"] - self.stats["ready_cpu_s"]) if self.stats else 0.0


def _storm(ops: int, workers: int) -> float:
    """Run the storm in its own sandbox; return its wall time."""
    stress = shutil.which("stress-ng")
    if stress is None:
        raise SystemExit("stress-ng is missing: run make setup")
    argv = [stress, "--fork", str(workers), "--fork-ops", str(ops), "--timeout", "60s", "--quiet"]
    with CgroupSandbox(f"remedy-bench-{uuid.uuid4().hex[:12]}", pids_max=512) as box:
        started = time.monotonic()
        proc = box.spawn(argv, stdout=subprocess.DEVNULL)
        proc.wait(90)
        return time.monotonic() - started


def _measure(mode: str, ops: int, workers: int, workdir: Path) -> Run:
    if mode == "none":
        return Run(mode, _storm(ops, workers), {})
    stats_path = workdir / f"{mode}.json"
    args = ["--dry-run", "--policies", str(REPO / "policies"), "--playbooks"]
    args += [str(REPO / "playbooks"), "--stats", str(stats_path), "--duration", "600"]
    if mode == "naive":
        args.append("--naive")
    agent = AgentProcess(args, cwd=REPO, log_path=workdir / f"{mode}.log")
    try:
        agent.wait_ready()
        storm_s = _storm(ops, workers)
        time.sleep(0.5)  # let the worker drain the queue
    finally:
        agent.stop(timeout_s=120)
    return Run(mode, storm_s, AgentProcess.read_stats(stats_path))


def _median_run(runs: list[Run]) -> Run:
    """The run with the median watching CPU (the storm time is its own median)."""
    ordered = sorted(runs, key=lambda r: r.watch_cpu_s)
    mid = ordered[len(ordered) // 2]
    return Run(mid.mode, statistics.median(r.storm_s for r in runs), mid.stats)


def _table(runs: dict[str, Run]) -> str:
    lines = [
        "| mode | storm wall s | kernel events seen | records to user space | decisions "
        "| events per record | agent CPU s (watching) | lost |",
        "|" + "---|" * 8,
    ]
    for mode in MODES:
        r = runs[mode]
        if not r.stats:
            lines.append(f"| {mode} (no agent) | {r.storm_s:.2f} | | | | | | |")
            continue
        s = r.stats
        seen, crossed = s["events_seen"], s["records_received"]
        lost = s["ringbuf_failed"] + s["queue_full"]
        lines.append(
            f"| {mode} | {r.storm_s:.2f} | {seen:,} | {crossed:,} | {sum(s['decisions'].values())} "
            f"| {seen / max(crossed, 1):,.0f} | {r.watch_cpu_s:.2f} | {lost:,} |"
        )
    funnel, naive, none = runs["funnel"], runs["naive"], runs["none"]
    lines += [
        "",
        "| ratio | value |",
        "|---|---|",
        f"| records crossing, naive / funnel | "
        f"{naive.stats['records_received'] / max(funnel.stats['records_received'], 1):,.0f}x |",
        f"| agent CPU watching, naive / funnel | "
        f"{naive.watch_cpu_s / max(funnel.watch_cpu_s, 0.01):.1f}x |",
        f"| storm wall time, funnel / no agent | {funnel.storm_s / none.storm_s:.2f} |",
        f"| storm wall time, naive / no agent | {naive.storm_s / none.storm_s:.2f} |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=40_000, help="forks per storm")
    parser.add_argument("--workers", type=int, default=2, help="stress-ng fork workers")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode")
    args = parser.parse_args()
    results: dict[str, list[Run]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="remedy-bench-") as tmp:
        for round_no in range(args.rounds):
            for mode in MODES:
                results[mode].append(_measure(mode, args.ops, args.workers, Path(tmp)))
                print(f"round {round_no + 1}/{args.rounds}: {mode} done", file=sys.stderr)
    print(
        f"fork storm: stress-ng --fork {args.workers} --fork-ops {args.ops}, agent in dry-run "
        f"with the shipped policy; median of {args.rounds} interleaved rounds\n"
    )
    print(_table({m: _median_run(rs) for m, rs in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
