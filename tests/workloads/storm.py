"""A bounded fork storm for tests and benchmarks: forks a child that exits at once, reaps it,
and repeats until a count or a time limit, optionally at a fixed rate."""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--forks", type=int, required=True, help="stop after this many forks")
    parser.add_argument("--seconds", type=float, required=True, help="stop after this long")
    parser.add_argument("--rate", type=float, default=0.0, help="forks per second (0: flat out)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    done = 0
    while done < args.forks and time.monotonic() < deadline:
        try:
            pid = os.fork()
        except BlockingIOError:  # pids.max reached: the cap is working; try again later
            time.sleep(0.001)
            continue
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        done += 1
        if interval:
            time.sleep(interval)
    print(f"forked {done}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
