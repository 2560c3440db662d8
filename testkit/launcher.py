"""Start programs inside given cgroups, and the agent as a child process (tests and bench)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The child writes its own pid into each cgroup.procs before exec, so it and everything it forks
# start inside the cgroups: no window where a storm runs unconfined.
_ENTER = (
    'for f in "$@"; do case "$f" in --) shift; break;; esac; echo $$ > "$f"; shift; done; exec "$@"'
)


def in_cgroups(procs_files: Sequence[Path], argv: Sequence[str]) -> list[str]:
    """An argv that joins ``procs_files`` (cgroup.procs paths), then execs ``argv``."""
    return ["/bin/sh", "-c", _ENTER, "sh", *map(str, procs_files), "--", *argv]


class AgentProcess:
    """``remedy run`` as a child process, with its output captured to a file."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        if "--journal" not in args:
            # Each agent its own journal: a journal is locked by the agent that holds it.
            args = [*args, "--journal", str(log_path.with_suffix(".undo.jsonl"))]
        if "--control-socket" not in args:  # and its own control socket
            args = [*args, "--control-socket", str(log_path.with_suffix(".sock"))]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "remedy", "run", *args],
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the agent prints its ready line (the BPF program is attached); 60 s, or
        $REMEDY_AGENT_READY_S (the VM's emulated CPUs compile the program far more slowly)."""
        if timeout_s is None:
            timeout_s = float(os.environ.get("REMEDY_AGENT_READY_S", "60"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "ready:" in self.output():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready after {timeout_s} s:\n{self.output()}")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    @staticmethod
    def read_stats(path: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
