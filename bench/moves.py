"""The residual pid-reuse window of a cgroup move, and the cost of the check that narrows it.

A move into a cgroup takes a pid number (cgroup.procs has no pidfd form), so remedy checks
through the pidfd right before the write that the process has not exited (``checked``). A wrong
move needs the process to exit, be reaped and its pid handed to a new fork inside the window
from that check to the end of the write. This measures the window, side by side with a move
done without the check (the bare write), over the same pinned child moving between two
sub-cgroups of a pids-limited CgroupSandbox. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable

from remedy.actions.base import checked
from remedy.actions.cgroups import CgroupDriver, detect
from remedy.actions.process import ProcessHandle
from remedy.proc import ProcFS
from testkit.sandbox import CgroupSandbox


def _times(moves: int, move: Callable[[int], None]) -> list[float]:
    """Microseconds per call of ``move(i)``."""
    out = []
    for i in range(moves):
        began = time.perf_counter_ns()
        move(i)
        out.append((time.perf_counter_ns() - began) / 1000)
    return sorted(out)


def _row(name: str, us: list[float]) -> str:
    p99 = us[int(len(us) * 0.99)]
    return f"| {name} | {statistics.median(us):.1f} | {p99:.1f} | {us[-1]:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--moves", type=int, default=2000, help="moves per mode")
    args = parser.parse_args()
    driver: CgroupDriver = detect()
    with CgroupSandbox(f"remedy-bench-{uuid.uuid4().hex[:12]}", pids_max=8) as box:
        for d in box.dirs:
            (d / "a").mkdir()
            (d / "b").mkdir()
        child = box.spawn(["sleep", "60"], stdout=subprocess.DEVNULL)
        time.sleep(0.05)
        handle = ProcessHandle.bind(child.pid, ProcFS())
        where = [f"{box.rel}/a", f"{box.rel}/b"]
        try:
            bare = _times(args.moves, lambda i: driver.move(child.pid, where[i % 2]))
            pinned = _times(
                args.moves,
                lambda i: driver.move(checked(child.pid, handle, "a move"), where[i % 2]),
            )
            # The window itself: from the check's answer to the end of the write.
            window = []
            for i in range(args.moves):
                pid = checked(child.pid, handle, "a move")
                began = time.perf_counter_ns()
                driver.move(pid, where[i % 2])
                window.append((time.perf_counter_ns() - began) / 1000)
            window.sort()
        finally:
            handle.close()
            child.kill()
            child.wait(5)
    print(f"{args.moves} moves of one pinned process between two cgroups ({driver.version=})")
    print()
    print("| what | median µs | p99 µs | worst µs |")
    print("|---|---|---|---|")
    print(_row("move, bare write", bare))
    print(_row("move, pidfd check then write", pinned))
    print(_row("residual window: check answered → write done", window))
    print()
    print(
        f"| ratio | value |\n|---|---|\n| checked / bare move | "
        f"{statistics.median(pinned) / statistics.median(bare):.2f} |"
    )


if __name__ == "__main__":
    main()
