"""What the agent costs to keep running, against bpftrace doing the same counting (issue 12, 9).

For each fork rate (idle, then paced storms, then flat out), one fresh agent (``remedy run
--dry-run`` with the shipped policies) and one fresh bpftrace (forks counted per pid in a 1 s
window, a line printed at the shipped threshold) watch the same bounded storm
(tests/workloads/storm.py, in a pids-limited cgroup) at the same time. Reported per observer:

- steady RSS (anonymous / file-backed), from /proc/PID/smaps_rollup once it is ready and has
  settled, and again after the storm (the agent has then identified offenders and symbolized
  their stacks); the agent's RSS by what it is made of, from /proc/PID/smaps;
- CPU while the storm runs, as a share of one core: the on-CPU time of every thread of the
  observer process (/proc/PID/task/*/schedstat, ns), over the storm's wall time. It is the
  user-space process's own cost; the BPF programs run in the forking tasks and are paid by
  the workload (bench.signals measures that).

Then the highest measured rate at which the agent stays under 0.1% of a core, with bpftrace's
share at that rate. Numbers are printed, never asserted: the 2-core VM is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from remedy.sensors import memory
from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

REPO = Path(__file__).resolve().parents[1]
STORM = REPO / "tests" / "workloads" / "storm.py"
THRESHOLD = 200  # the shipped fork-bomb policy: 200 forks per 1 s
BPFTRACE = (
    f"tracepoint:sched:sched_process_fork {{ @n[pid]++; if (@n[pid] == {THRESHOLD}) {{ "
    f'printf("%d %s: {THRESHOLD} forks in this 1 s window\\n", pid, comm); }} }} '
    "interval:s:1 { clear(@n); }"
)
# Forks per second asked of storm.py (0: idle, -1: flat out). It reaches less (a fork and a
# sleep per event): the table shows what it reached. 50 and 150 stay under the threshold.
RATES = (0, 50, 150, 1_000, -1)
UNDER = 0.1  # percent of a core
SETTLE_S = 2.0
_RELEASED = re.compile(r"^memory: gave back .*$", re.M)


@dataclass
class Sample:
    """One observer during one storm."""

    steady: memory.Usage | None = None
    after: memory.Usage | None = None
    cpu_pct: float | None = None
    groups: dict[str, memory.Usage] = field(default_factory=dict)


@dataclass
class Step:
    """One rate: both observers on the same storm."""

    rate: int
    achieved: float = 0.0  # forks per second the storm reached
    agent: Sample = field(default_factory=Sample)
    bpftrace: Sample = field(default_factory=Sample)
    records: int | None = None
    events: int | None = None
    released: str = ""
    error: str = ""


def _on_cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of ``pid`` (first field of schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total


def _usage(pid: int) -> memory.Usage:
    return memory.usage(Path(f"/proc/{pid}/smaps_rollup"))


def _groups(pid: int) -> dict[str, memory.Usage]:
    return memory.breakdown(memory.parse_smaps(Path(f"/proc/{pid}/smaps").read_text()))


class Bpftrace:
    """The one-liner as a child process, its output drained so it never blocks."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["bpftrace", "-e", BPFTRACE],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.attached = threading.Event()
        self.head: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if len(self.head) < 20:
                self.head.append(line)
            if line.startswith("Attaching"):
                self.attached.set()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.attached.wait(0.05):
            if not self._reader.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"bpftrace did not attach: {''.join(self.head)[-300:]}")
        time.sleep(0.5)  # "Attaching" is printed just before the attach calls

    def stop(self) -> None:
        # Not reaped until here, so the pid is still bpftrace's.
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def _storm(rate: int, seconds: float) -> float:
    """Run the storm (at rate 0, nothing) for at most ``seconds``; the forks per second reached.
    Paced rates: storm.py, one forking process. Flat out: stress-ng's two fork workers, the
    fastest forker on this VM (bench.signals' fork storm)."""
    if rate == 0:
        time.sleep(seconds)
        return 0.0
    if rate < 0:
        argv = ["stress-ng", "--fork", "2", "--fork-ops", str(int(5_000 * seconds))]
        argv += ["--timeout", f"{seconds:g}s", "--metrics-brief"]
        done_re = rb"metrc: \[\d+\]\s+fork\s+(\d+)\s"
    else:
        argv = [sys.executable, str(STORM), "fork", "--count", str(int(rate * seconds))]
        argv += ["--seconds", str(seconds), "--rate", str(rate)]
        done_re = rb"fork (\d+)"
    with CgroupSandbox(f"remedy-bench-{uuid.uuid4().hex[:12]}", pids_max=512) as box:
        started = time.monotonic()
        proc = box.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/tmp")
        out, _ = proc.communicate(timeout=seconds + 30)
        wall = time.monotonic() - started
    done = re.search(done_re, out)
    if proc.returncode != 0 or done is None:
        raise RuntimeError(f"storm exited {proc.returncode}: {out[-200:]!r}")
    return int(done.group(1)) / wall


def _agent_args(workdir: Path) -> list[str]:
    return [
        "--dry-run",
        "--policies",
        str(REPO / "policies"),
        "--playbooks",
        str(REPO / "playbooks"),
        "--audit",
        str(workdir / "audit.jsonl"),
        "--stats",
        str(workdir / "stats.json"),
        "--duration",
        "600",
    ]


def _measure(rate: int, seconds: float, workdir: Path) -> Step:
    step = Step(rate)
    (workdir / "stats.json").unlink(missing_ok=True)
    agent = AgentProcess(_agent_args(workdir), cwd=REPO, log_path=workdir / f"agent-{rate}.log")
    tracer: Bpftrace | None = None
    try:
        tracer = Bpftrace()
        agent.wait_ready()
        tracer.wait_ready()
        time.sleep(SETTLE_S)
        pids = {"agent": agent.proc.pid, "bpftrace": tracer.proc.pid}
        samples = {"agent": step.agent, "bpftrace": step.bpftrace}
        for name, pid in pids.items():
            samples[name].steady = _usage(pid)
        before = {name: _on_cpu_ns(pid) for name, pid in pids.items()}
        started = time.monotonic()
        step.achieved = _storm(rate, seconds)
        wall = time.monotonic() - started
        for name, pid in pids.items():
            samples[name].cpu_pct = (_on_cpu_ns(pid) - before[name]) / (wall * 1e9) * 100
            samples[name].after = _usage(pid)
            samples[name].groups = _groups(pid)
    except Exception as err:  # a failed rate is reported in its row, never crashes the table
        step.error = f"{type(err).__name__}: {err}"[:200]
    finally:
        if tracer is not None:
            tracer.stop()
        agent.stop(timeout_s=60)
    stats_path = workdir / "stats.json"
    if stats_path.exists():
        stats = AgentProcess.read_stats(stats_path)
        step.records, step.events = stats["records_received"], stats["events_seen"]
    found = _RELEASED.search(agent.output())
    step.released = found.group(0) if found else ""
    return step


def _mib(kib: float | None) -> str:
    return "" if kib is None else f"{kib / 1024:.1f}"


def _median_usage(usages: Sequence[memory.Usage | None]) -> memory.Usage | None:
    found = [u for u in usages if u is not None]
    if not found:
        return None
    return memory.Usage(
        int(statistics.median(u.rss_kib for u in found)),
        int(statistics.median(u.anon_kib for u in found)),
    )


def _rss_table(steps: Sequence[Step]) -> list[str]:
    lines = [
        "| observer | when | RSS MiB | anonymous MiB | file-backed MiB |",
        "|---|---|---:|---:|---:|",
    ]
    medians: dict[tuple[str, str], memory.Usage | None] = {}
    for who in ("agent", "bpftrace"):
        for when in ("steady", "after"):
            usage = _median_usage([getattr(getattr(s, who), when) for s in steps])
            medians[who, when] = usage
            label = "ready, settled" if when == "steady" else "after the storm"
            rss, anon = (usage.rss_kib, usage.anon_kib) if usage else (None, None)
            file_kib = usage.file_kib if usage else None
            lines.append(f"| {who} | {label} | {_mib(rss)} | {_mib(anon)} | {_mib(file_kib)} |")
    agent, tracer = medians["agent", "after"], medians["bpftrace", "after"]
    if agent and tracer:
        lines += [
            "",
            "| ratio (after the storm) | agent / bpftrace |",
            "|---|---:|",
            f"| RSS | {agent.rss_kib / tracer.rss_kib:.2f} |",
            f"| anonymous | {agent.anon_kib / max(tracer.anon_kib, 1):.2f} |",
            f"| file-backed | {agent.file_kib / max(tracer.file_kib, 1):.2f} |",
        ]
    return lines


def _groups_table(step: Step) -> list[str]:
    names = sorted(
        set(step.agent.groups) | set(step.bpftrace.groups),
        key=lambda n: -step.agent.groups.get(n, memory.Usage(0, 0)).rss_kib,
    )
    lines = [
        "| what (after the storm) | agent RSS MiB | of it anonymous | bpftrace RSS MiB |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        a, b = step.agent.groups.get(name), step.bpftrace.groups.get(name)
        lines.append(
            f"| {name} | {_mib(a.rss_kib if a else None)} | {_mib(a.anon_kib if a else None)} "
            f"| {_mib(b.rss_kib if b else None)} |"
        )
    return lines


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}%"


def _rate_label(rate: int) -> str:
    return {0: "idle", -1: "flat out"}.get(rate, f"{rate:,}/s")


def _cpu_table(steps: Sequence[Step]) -> list[str]:
    lines = [
        "| storm paced at | forks/s reached | kernel events seen | records to user space "
        "| agent CPU % of a core | bpftrace CPU % of a core | agent / bpftrace | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        a, b = s.agent.cpu_pct, s.bpftrace.cpu_pct
        ratio = f"{a / b:.2f}" if a is not None and b else ""
        events = "" if s.events is None else f"{s.events:,}"
        records = "" if s.records is None else f"{s.records:,}"
        lines.append(
            f"| {_rate_label(s.rate)} | {s.achieved:,.0f} | {events} | {records} "
            f"| {_pct(a)} | {_pct(b)} | {ratio} | {s.error} |"
        )
    return lines


def _verdict(steps: Sequence[Step]) -> str:
    under = [s for s in steps if s.agent.cpu_pct is not None and s.agent.cpu_pct < UNDER]
    if not under:
        idle = next((s for s in steps if s.rate == 0 and s.agent.cpu_pct is not None), None)
        floor = f" (idle: {_pct(idle.agent.cpu_pct)})" if idle else ""
        return f"The agent's CPU was at or above {UNDER}% of a core at every rate measured{floor}."
    best = max(under, key=lambda s: s.achieved)
    rate = "idle" if best.rate == 0 else f"{best.achieved:,.0f} forks/s"
    return (
        f"Highest measured rate at which the agent stays under {UNDER}% of a core: {rate} "
        f"(agent {_pct(best.agent.cpu_pct)}, bpftrace {_pct(best.bpftrace.cpu_pct)} at that rate)."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="storm length per rate")
    parser.add_argument(
        "--rates",
        type=int,
        nargs="+",
        default=list(RATES),
        help="forks per second (0: idle, -1: flat out)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.agent_cost needs root (BPF programs and cgroups)")
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="remedy-bench-") as tmp:
        for rate in args.rates:
            step = _measure(rate, args.seconds, Path(tmp))
            steps.append(step)
            what = step.error or f"{step.achieved:,.0f} forks/s"
            print(f"{_rate_label(rate)}: {what}", file=sys.stderr)
    print(
        f"agent: remedy run --dry-run, shipped policies (fork_rate ≥ {THRESHOLD} per 1 s); "
        f"bpftrace: bpftrace -e '{BPFTRACE}'\n"
        f"storm: tests/workloads/storm.py fork --rate R for {args.seconds:g} s (flat out: "
        "stress-ng --fork 2), in a pids-limited cgroup; one fresh agent and bpftrace per rate, "
        "both watching the same storm\n"
    )
    released = next((s.released for s in steps if s.released), "")
    if released:
        print(f"agent at start: {released}\n")
    print("\n".join(_rss_table(steps)))
    print()
    last = next((s for s in reversed(steps) if s.agent.groups), None)
    if last is not None:
        print("\n".join(_groups_table(last)))
        print()
    print("\n".join(_cpu_table(steps)))
    print()
    print(_verdict(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
