"""Bounded workloads for tests and benchmarks: each trips one signal (or, slower, none).

Every mode stops after ``--count`` events or ``--seconds``, whichever comes first, and can be
paced with ``--rate`` (events per second, 0 = flat out). Run inside a pids-limited cgroup.

Modes: fork (fork a child that exits at once), exec (fork + exec /bin/true), churn (same as
fork, with ``--child-ms`` lifetime), cpu (spin), rss (allocate and touch ``--count`` MiB),
open (open and close /dev/null), fdleak (open /dev/null and keep it), connect (connect to a
loopback listener this process owns), fanout (fork a child that forks a grandchild: many
distinct forking processes).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable


def _fork(child_ms: float) -> Callable[[], None]:
    def step() -> None:
        try:
            pid = os.fork()
        except BlockingIOError:  # pids.max reached: the cap is working; try again later
            time.sleep(0.001)
            return
        if pid == 0:
            if child_ms:
                time.sleep(child_ms / 1000)
            os._exit(0)
        os.waitpid(pid, 0)

    return step


def _fanout() -> Callable[[], None]:
    """Each event: a child that forks one grandchild, so every event is a new forking process."""

    def step() -> None:
        try:
            pid = os.fork()
        except BlockingIOError:
            time.sleep(0.001)
            return
        if pid == 0:
            try:
                grandchild = os.fork()
                if grandchild == 0:
                    os._exit(0)
                os.waitpid(grandchild, 0)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    return step


def _exec() -> Callable[[], None]:
    def step() -> None:
        try:
            pid = os.posix_spawn("/bin/true", ["true"], os.environ)
        except BlockingIOError:
            time.sleep(0.001)
            return
        os.waitpid(pid, 0)

    return step


def _open(keep: list[int] | None) -> Callable[[], None]:
    def step() -> None:
        fd = os.open("/dev/null", os.O_RDONLY)
        if keep is None:
            os.close(fd)
        else:
            keep.append(fd)

    return step


def _connect() -> tuple[Callable[[], None], socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    address = listener.getsockname()

    def step() -> None:
        with socket.socket() as s:
            s.connect(address)
        conn, _ = listener.accept()
        conn.close()

    return step, listener


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "mode",
        choices=("fork", "exec", "churn", "cpu", "rss", "open", "fdleak", "connect", "fanout"),
    )
    parser.add_argument("--count", type=int, required=True, help="stop after this many events")
    parser.add_argument("--seconds", type=float, required=True, help="stop after this long")
    parser.add_argument("--rate", type=float, default=0.0, help="events per second (0: flat out)")
    parser.add_argument("--child-ms", type=float, default=0.0, help="fork/churn child lifetime")
    parser.add_argument("--hold", type=float, default=0.0, help="stay alive this long after")
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    done = 0
    if args.mode == "cpu":
        while time.monotonic() < deadline:
            pass
    elif args.mode == "rss":
        block = bytearray(args.count << 20)
        for i in range(0, len(block), 4096):  # touch every page: anonymous RSS, not just VSZ
            block[i] = 1
        done = args.count
        time.sleep(max(0.0, deadline - time.monotonic()))
    else:
        fds: list[int] = []
        listener = None
        if args.mode in ("fork", "churn"):
            step = _fork(args.child_ms)
        elif args.mode == "exec":
            step = _exec()
        elif args.mode == "fanout":
            step = _fanout()
        elif args.mode == "connect":
            step, listener = _connect()
        else:
            step = _open(fds if args.mode == "fdleak" else None)
        while done < args.count and time.monotonic() < deadline:
            step()
            done += 1
            if interval:
                time.sleep(interval)
        if listener is not None:
            listener.close()
    time.sleep(args.hold)
    print(f"{args.mode} {done}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
