"""A throw-away cgroup for bounded workloads (tests and benchmarks).

Every storm the tests or ``make bench`` start runs inside one of these: a uniquely named cgroup
with a pids limit, whose members are all descendants of what was spawned into it, so cleanup
may kill them without risk to the host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from testkit.launcher import in_cgroups

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupSandbox:
    """A uniquely named cgroup (v1: in the pids and cpu hierarchies; v2: one directory) with a
    pids limit, so every storm a test starts is bounded. Teardown kills only processes inside it
    (all spawned by the test) and removes the whole subtree, deepest first."""

    def __init__(self, name: str, pids_max: int = 256, root: Path = CGROUP_ROOT) -> None:
        self.name = name
        self.v2 = (root / "cgroup.controllers").exists()
        roots = [root] if self.v2 else [root / "pids", root / "cpu"]
        if not self.v2 and (root / "unified" / "cgroup.procs").exists():
            # Hybrid host: join a cgroup2 directory too, so the workload has a cgroup id of its
            # own (bpf_get_current_cgroup_id() reads the cgroup2 hierarchy).
            roots.append(root / "unified")
        self.dirs = [r / name for r in roots]
        for d in self.dirs:
            d.mkdir()
        (self.dirs[0] / "pids.max").write_text(f"{pids_max}\n")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def rel(self) -> str:
        return f"/{self.name}"

    @property
    def has_cgroup_id(self) -> bool:
        return self.v2 or self.dirs[-1].parent.name == "unified"

    @property
    def cgroup_id(self) -> int:
        """The id BPF sees for members: the inode of the cgroup2 directory."""
        v2_dir = self.dirs[0] if self.v2 else self.dirs[-1]
        if not self.v2 and v2_dir.parent.name != "unified":
            raise RuntimeError("no cgroup2 directory on this host")
        return v2_dir.stat().st_ino

    @property
    def pids_dir(self) -> Path:
        return self.dirs[0]

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            in_cgroups(self.procs_files(), argv),
            **kwargs,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def members(self) -> list[int]:
        pids: set[int] = set()
        for d in self.dirs:
            for procs in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in procs.read_text().split())
        return sorted(pids)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for _ in range(100):
            members = self.members()
            if not members:
                break
            for pid in members:  # only descendants of what this test spawned live here
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(pid)
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    finally:
                        os.close(fd)
            time.sleep(0.05)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for d in self.dirs:
            if not d.exists():
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)

    def __enter__(self) -> CgroupSandbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()
