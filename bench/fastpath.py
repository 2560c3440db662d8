"""Reaction time: the user-space path against the in-kernel fast path, side by side in one run.

The same bounded storm (tests/workloads/storm.py fork, flat out, at most 20000 forks or 10 s,
in a pids-limited CgroupSandbox) is stopped by
- ``user``: the real agent (``remedy run``, enforce), a fork_rate policy of 200 per 1 s matching
  only the sandbox's cgroup, a playbook whose single step is kill SIGKILL: kernel record → ring
  buffer → engine → pidfd signal;
- ``kernel``: the fast path in threshold mode (same 200 per 1 s, SIGKILL, cgroup filter = the
  sandbox), which signals inside sched_process_fork.

Measured: time from spawning the storm (its shell wrapper included, the same for both) to its
death, and the forks that got through. The forks are counted by the bench's own KernelSensor,
a second copy of the program that the agent does not see: its fork_rate window for the storm's
pid (in ``user`` mode with a threshold nothing reaches; in ``kernel`` mode it is the window the
fast path itself reads). Modes are interleaved; medians of the rounds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from remedy.sensors.catalog import SignalSettings
from remedy.sensors.fastpath import FastPath, default_protected
from remedy.sensors.kernel import KernelSensor
from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

REPO = Path(__file__).resolve().parents[1]
STORM = REPO / "tests" / "workloads" / "storm.py"
MODES = ("user", "kernel")
THRESHOLD = 200
WINDOW_S = 1.0

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: bench-fastpath
signal: fork_rate
threshold: {threshold}
window: 1s
match:
  cgroups: ["{rel}", "{rel}/*"]
playbook: bench-kill
dry_run: false
cooldown: 500ms
release_after: 5s
rate_limit: {{max_actions: 20, per: 1m}}
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: bench-kill
steps:
  - action: kill
    params: {signal: SIGKILL}
"""


@dataclass
class Run:
    mode: str
    death_ms: float
    forks: int
    returncode: int


def _storm(box: CgroupSandbox, counter: KernelSensor, count: int, seconds: float) -> Run:
    argv = [sys.executable, str(STORM), "fork", "--count", str(count), "--seconds", str(seconds)]
    started = time.monotonic()
    proc = box.spawn(argv, stderr=subprocess.DEVNULL)
    rc = proc.wait(seconds + 30)
    death_ms = (time.monotonic() - started) * 1000
    forks = counter.window_value("fork_rate", proc.pid) or 0
    return Run("", death_ms, forks, rc)


def _user(counter: KernelSensor, workdir: Path, count: int, seconds: float) -> Run:
    # Count only: a threshold nothing reaches, a window longer than the storm.
    counter.configure({"fork_rate": SignalSettings(window_s=60.0, threshold=1 << 40)})
    with CgroupSandbox(f"remedy-bench-{uuid.uuid4().hex[:12]}", pids_max=256) as box:
        policies, playbooks = workdir / "policies", workdir / "playbooks"
        policies.mkdir(exist_ok=True)
        playbooks.mkdir(exist_ok=True)
        (policies / "fork.yaml").write_text(POLICY.format(threshold=THRESHOLD, rel=box.rel))
        (playbooks / "kill.yaml").write_text(PLAYBOOK)
        args = ["--policies", str(policies), "--playbooks", str(playbooks)]
        args += ["--audit", str(workdir / "audit.jsonl"), "--stats", str(workdir / "stats.json")]
        args += ["--quarantine-root", f"{box.rel}/quarantine", "--duration", "120"]
        agent = AgentProcess(args, cwd=REPO, log_path=workdir / "agent.log")
        try:
            agent.wait_ready()
            run = _storm(box, counter, count, seconds)
        finally:
            agent.stop()
    run.mode = "user"
    return run


def _kernel(counter: KernelSensor, fp: FastPath, count: int, seconds: float) -> Run:
    counter.configure({"fork_rate": SignalSettings(window_s=WINDOW_S, threshold=THRESHOLD)})
    with CgroupSandbox(f"remedy-bench-{uuid.uuid4().hex[:12]}", pids_max=256) as box:
        try:
            fp.set_policy(True, signal.SIGKILL, dry_run=False, cgroup_id=box.cgroup_id)
            run = _storm(box, counter, count, seconds)
        finally:
            fp.set_policy(False, 0, dry_run=True)
    run.mode = "kernel"
    return run


def _table(results: dict[str, list[Run]]) -> str:
    lines = [
        "| path | storm start → death, ms (median) | forks that got through (median) "
        "| killed by SIGKILL | rounds: ms / forks |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        runs = results[mode]
        killed = sum(r.returncode == -signal.SIGKILL for r in runs)
        each = ", ".join(f"{r.death_ms:.0f} / {r.forks}" for r in runs)
        lines.append(
            f"| {mode} | {statistics.median(r.death_ms for r in runs):.0f} "
            f"| {statistics.median(r.forks for r in runs):.0f} | {killed}/{len(runs)} | {each} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000, help="forks per storm at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="storm length at most")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path")
    args = parser.parse_args()
    results: dict[str, list[Run]] = {m: [] for m in MODES}
    counter = KernelSensor(stacks=False)
    counter.start({"fork_rate": SignalSettings(window_s=60.0, threshold=1 << 40)})
    fp = FastPath(counter)
    fp.protect(default_protected())
    try:
        with tempfile.TemporaryDirectory(prefix="remedy-bench-") as tmp:
            for round_no in range(args.rounds):
                for mode in MODES:
                    if mode == "user":
                        run = _user(counter, Path(tmp), args.count, args.seconds)
                    else:
                        run = _kernel(counter, fp, args.count, args.seconds)
                    results[mode].append(run)
                    print(f"round {round_no + 1}/{args.rounds}: {mode} done", file=sys.stderr)
    finally:
        fp.disable()
        counter.close()
    print(
        f"fork storm: storm.py fork flat out, at most {args.count} forks / {args.seconds:g} s, "
        f"in a pids-limited cgroup; fork_rate {THRESHOLD} per {WINDOW_S:g} s, SIGKILL; "
        f"median of {args.rounds} interleaved rounds. Forks counted by a separate copy of the "
        f"kernel program (fork_rate window of the storm's pid).\n"
    )
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
