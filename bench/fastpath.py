"""Reaction time of what a user can configure, side by side in one run.

The same bounded storm (tests/workloads/storm.py fork, flat out, at most 20000 forks or 10 s,
in a pids-limited CgroupSandbox) is stopped by the real agent (``remedy run``, enforce), a
fork_rate policy of 200 per 1 s matching only the sandbox's cgroup, in three configurations:
- ``user``: the playbook's step is kill SIGKILL: kernel record → ring buffer → engine → pidfd;
- ``armed``: the same step with ``kernel: true``: user space arms the offender, the kernel
  signals it at its next fork;
- ``policy``: the policy says ``kernel: kill``: the kernel signals the forker itself on every
  fork at or over the threshold, before any record reaches user space.
Every mode runs the same programs (the agent's, plus the bench's counter), so none is cheaper
for running less BPF.

Measured: time from spawning the storm to its death, and the forks that got through after the
crossing (the bench's own KernelSensor, a second copy of the program the agent does not see,
counts the storm's forks in a window longer than the storm; minus the threshold). Modes are
interleaved; medians of the rounds. Prints a markdown table.
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

from remedy.compiler import SensorPlan, SignalPlan, Tier, WindowClass
from remedy.sensors.kernel import KernelSensor
from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

REPO = Path(__file__).resolve().parents[1]
STORM = REPO / "tests" / "workloads" / "storm.py"
MODES = ("user", "armed", "policy")
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
dry_run: false{kernel}
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
    params: {{signal: SIGKILL}}{armed}
"""


@dataclass
class Run:
    mode: str
    death_ms: float
    forks: int
    returncode: int


# The bench's counter: one tier nothing reaches, a window longer than any storm.
COUNT_ONLY = SensorPlan(
    {"fork_rate": SignalPlan("fork_rate", (WindowClass(0, 60.0, (Tier(1, "count", 1 << 40),)),))}
)


def _storm(box: CgroupSandbox, counter: KernelSensor, count: int, seconds: float) -> Run:
    argv = [sys.executable, str(STORM), "fork", "--count", str(count), "--seconds", str(seconds)]
    started = time.monotonic()
    proc = box.spawn(argv, stderr=subprocess.DEVNULL)
    rc = proc.wait(seconds + 30)
    death_ms = (time.monotonic() - started) * 1000
    forks = counter.window_value("fork_rate", proc.pid) or 0
    return Run("", death_ms, max(0, forks - THRESHOLD), rc)


def _run(mode: str, counter: KernelSensor, workdir: Path, count: int, seconds: float) -> Run:
    with CgroupSandbox(f"remedy-bench-{uuid.uuid4().hex[:12]}", pids_max=256) as box:
        policies, playbooks = workdir / "policies", workdir / "playbooks"
        policies.mkdir(exist_ok=True)
        playbooks.mkdir(exist_ok=True)
        kernel = "\nkernel: kill" if mode == "policy" else ""
        armed = "\n    kernel: true" if mode == "armed" else ""
        (policies / "fork.yaml").write_text(
            POLICY.format(threshold=THRESHOLD, rel=box.rel, kernel=kernel)
        )
        (playbooks / "kill.yaml").write_text(PLAYBOOK.format(armed=armed))
        args = ["--policies", str(policies), "--playbooks", str(playbooks)]
        args += ["--audit", str(workdir / "audit.jsonl"), "--stats", str(workdir / "stats.json")]
        args += ["--quarantine-root", f"{box.rel}/quarantine", "--duration", "120"]
        args += ["--control-socket", str(workdir / "control.sock")]
        agent = AgentProcess(args, cwd=REPO, log_path=workdir / "agent.log")
        try:
            agent.wait_ready()
            run = _storm(box, counter, count, seconds)
        finally:
            agent.stop()
    run.mode = mode
    return run


def _table(results: dict[str, list[Run]]) -> str:
    lines = [
        "| configured as | storm start → death, ms (median) | forks after the crossing (median) "
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
    counter.start(COUNT_ONLY)
    try:
        with tempfile.TemporaryDirectory(prefix="remedy-bench-") as tmp:
            for round_no in range(args.rounds):
                for mode in MODES:
                    results[mode].append(_run(mode, counter, Path(tmp), args.count, args.seconds))
                    print(f"round {round_no + 1}/{args.rounds}: {mode} done", file=sys.stderr)
    finally:
        counter.close()
    print(
        f"fork storm: storm.py fork flat out, at most {args.count} forks / {args.seconds:g} s, "
        f"in a pids-limited cgroup; fork_rate {THRESHOLD} per {WINDOW_S:g} s, SIGKILL, by the "
        f"agent as configured; "
        f"median of {args.rounds} interleaved rounds. Forks counted by a separate copy of the "
        f"kernel program (fork_rate window of the storm's pid), minus the threshold.\n"
    )
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
