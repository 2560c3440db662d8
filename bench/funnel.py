"""The funnel against the naive agent, side by side on the same fork storm, in one run.

For each mode the same bounded storm (stress-ng's fork stressor, inside a pids-limited cgroup)
runs while the agent watches in dry-run: ``none`` (no agent) is the storm's own cost; ``funnel``
counts in the kernel and lets one record per offender per window cross; ``naive`` is the same
agent with every fork crossing to user space and counted in Python. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remedy.service.launcher import AgentProcess
from remedy.service.sandbox import CgroupSandbox

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    mode: str
    storm_s: float
    stats: dict[str, Any]


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


def _measure(mode: str, ops: int, workers: int, workdir: Path) -> Row:
    if mode == "none":
        return Row(mode, _storm(ops, workers), {})
    stats_path = workdir / f"{mode}.json"
    args = ["--dry-run", "--policies", str(REPO / "policies"), "--playbooks"]
    args += [str(REPO / "playbooks"), "--stats", str(stats_path), "--duration", "600"]
    if mode == "naive":
        args.append("--naive")
    agent = AgentProcess(args, cwd=REPO, log_path=workdir / f"{mode}.log")
    try:
        agent.wait_ready()
        time.sleep(1.0)  # let start-up CPU settle out of the window we compare
        storm_s = _storm(ops, workers)
        time.sleep(1.0)  # let the worker drain the queue
    finally:
        agent.stop(timeout_s=120)
    return Row(mode, storm_s, AgentProcess.read_stats(stats_path))


def _table(rows: list[Row]) -> str:
    head = (
        "| mode | storm wall s | kernel events seen | records to user space | decisions "
        "| reduction (events/record) | agent CPU s | lost |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if not r.stats:
            lines.append(f"| {r.mode} (no agent) | {r.storm_s:.2f} | | | | | | |")
            continue
        s = r.stats
        seen, crossed = s["events_seen"], max(s["records_received"], 1)
        decisions = sum(s["decisions"].values())
        lost = s["ringbuf_failed"] + s["queue_full"]
        lines.append(
            f"| {r.mode} | {r.storm_s:.2f} | {seen:,} | {s['records_received']:,} | {decisions} "
            f"| {seen / crossed:,.0f} : 1 | {s['cpu_s']:.2f} | {lost:,} |"
        )
    by = {r.mode: r for r in rows}
    if "funnel" in by and "naive" in by:
        f, n = by["funnel"].stats, by["naive"].stats
        ratio = n["cpu_s"] / max(f["cpu_s"], 0.01)
        lines.append("")
        lines.append(
            f"naive / funnel agent CPU: {ratio:.1f}x; records crossing: "
            f"{n['records_received'] / max(f['records_received'], 1):,.0f}x"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=60_000, help="forks per storm")
    parser.add_argument("--workers", type=int, default=2, help="stress-ng fork workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="remedy-bench-") as tmp:
        rows = [_measure(m, args.ops, args.workers, Path(tmp)) for m in ("none", "funnel", "naive")]
    print(f"fork storm: stress-ng --fork {args.workers} --fork-ops {args.ops}, agent in dry-run\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
