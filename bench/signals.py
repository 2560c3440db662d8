"""What watching costs, per signal: remedy against bpftrace on fork, exec, open and connect storms.

For each storm (stress-ng flat out, bounded by an op count and a timeout, inside a pids-limited
cgroup) three modes are measured, interleaved over several rounds, medians reported:

- ``none``: no observer; the storm's own throughput (bogo ops per wall second);
- ``remedy``: the agent in dry-run with one armed policy on that storm's signal (a threshold no
  process reaches, so the kernel counts every event and nothing is acted on);
- ``bpftrace``: the one-liner a user would reach for, counting the same events per process in a
  BPF map (printed at exit, to /dev/null).

Both observers' CPU is counted while watching only (from attached to stopped): remedy's
``cpu_s - ready_cpu_s``, bpftrace's utime+stime from /proc between "Attaching" and SIGINT.
Prints the commands, one markdown table and a ratio section. A mode that fails prints its error
in its row; the table is always printed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import shutil
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

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "remedy", "bpftrace")
PIDS_MAX = 512
STORM_TIMEOUT_S = 60
# The least run-to-run spread assumed; the measured no-observer spread is used when larger.
NOISE = 0.03
_MAP_ENTRY = re.compile(r"@\[\d+\]: (\d+)$")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


@dataclass(frozen=True)
class Storm:
    """One workload and the signal that watches it."""

    name: str
    signal: str  # remedy's catalogue name (remedy/sensors/catalog.py)
    stressor: str  # stress-ng stressor; its bogo ops are the throughput
    workers: int
    ops: int  # sized for ~5 s flat out on the 2-core bench VM
    extra: tuple[str, ...]
    bpftrace: str  # the same per-process count, as a user would write it
    as_nobody: bool = False  # stress-ng's exec stressor refuses to run as root

    def argv(self, scale: float) -> list[str]:
        ops = max(1, int(self.ops * scale))
        argv = ["stress-ng", f"--{self.stressor}", str(self.workers)]
        argv += [f"--{self.stressor}-ops", str(ops), *self.extra]
        argv += ["--timeout", f"{STORM_TIMEOUT_S}s", "--metrics-brief"]
        return [*_AS_NOBODY, *argv] if self.as_nobody else argv


STORMS: tuple[Storm, ...] = (
    Storm(
        "fork",
        "fork_rate",
        "fork",
        2,
        15_000,
        (),
        "tracepoint:sched:sched_process_fork { @[pid] = count(); }",
    ),
    Storm(
        "exec",
        "exec_rate",
        "exec",
        2,
        1_600,
        # Small batches: with the default (4096 children per iteration) the op bound overshoots
        # by thousands and the run takes 30 s.
        ("--exec-max", "4"),
        "tracepoint:sched:sched_process_exec { @[pid] = count(); }",
        as_nobody=True,
    ),
    Storm(
        "open",
        "open_rate",
        "open",
        2,
        45_000,
        (),
        "tracepoint:syscalls:sys_exit_openat /args->ret >= 0/ { @[pid] = count(); }",
    ),
    Storm(
        "connect",
        "connect_rate",
        "sock",
        1,
        2_800,
        # One loopback TCP connect per bogo op. (sockmany connects faster at first, but it
        # exhausts ephemeral ports and slows by 5x within seconds and across runs.)
        (),
        "tracepoint:syscalls:sys_enter_connect { @[pid] = count(); }",
    ),
)

_POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: bench-{storm}
description: "armed, never crossed: the kernel counts every event, nothing is acted on"
signal: {signal}
threshold: 1000000
window: 1s
playbook: contain-fork-bomb
dry_run: true
cooldown: 2s
release_after: 10s
"""


@dataclass
class Run:
    """One measurement of one mode on one storm; ``error`` set when it failed."""

    ops_s: float = 0.0
    wall_s: float = 0.0
    events_seen: int | None = None  # kernel events counted (remedy: its signal; bpftrace: map sum)
    records: int | None = None  # remedy: records received in user space
    cpu_s: float | None = None  # observer CPU while watching
    rss_mib: float | None = None  # observer peak resident memory
    error: str = ""


@dataclass
class Row:
    """Medians over the rounds that succeeded, with the errors of those that did not."""

    mode: str
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if not r.error]

    def median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.ok if getattr(r, attr) is not None]
        return statistics.median(values) if values else None

    def errors(self) -> str:
        failed = [r.error for r in self.runs if r.error]
        if not failed:
            return ""
        return f"{len(failed)}/{len(self.runs)} rounds failed: " + "; ".join(sorted(set(failed)))


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "/")
    # Keep both ends: the start says what failed, the end of a traceback says why.
    return text if len(text) <= limit else text[:60] + " … " + text[-(limit - 63) :]


def _tail(output: str, lines: int = 2) -> str:
    """The end of a program's output: where a traceback says what went wrong."""
    return " / ".join([line for line in output.splitlines() if line.strip()][-lines:])


def _bogo_ops(output: str, stressor: str) -> int:
    """Bogo ops from stress-ng's --metrics-brief line: ``metrc: [pid] fork  15000  5.30 ...``."""
    match = re.search(rf"metrc: \[\d+\]\s+{re.escape(stressor)}\s+(\d+)\s", output)
    if match is None:
        raise RuntimeError(f"no metrics line for {stressor} in stress-ng output: {output[-300:]}")
    return int(match.group(1))


def _storm(storm: Storm, scale: float) -> Run:
    """Run the storm in its own sandbox; its throughput over the wall time seen from here."""
    with CgroupSandbox(f"remedy-bench-{uuid.uuid4().hex[:12]}", pids_max=PIDS_MAX) as box:
        started = time.monotonic()
        proc = box.spawn(
            storm.argv(scale), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/tmp"
        )
        try:
            out, _ = proc.communicate(timeout=STORM_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"stress-ng still running after {STORM_TIMEOUT_S + 30} s") from err
        wall = time.monotonic() - started
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"stress-ng exited {proc.returncode}: {_tail(text, 3)}")
    ops = _bogo_ops(text, storm.stressor)
    if wall >= STORM_TIMEOUT_S:
        raise RuntimeError(f"storm hit its {STORM_TIMEOUT_S} s timeout ({ops} ops)")
    return Run(ops_s=ops / wall, wall_s=wall)


def _remedy(storm: Storm, scale: float, workdir: Path) -> Run:
    policies = workdir / f"policies-{storm.name}"
    stats_path = workdir / f"{storm.name}.json"
    stats_path.unlink(missing_ok=True)
    agent = AgentProcess(
        _agent_args(policies, workdir / "playbooks", stats_path),
        cwd=REPO,
        log_path=workdir / f"{storm.name}.log",
    )
    try:
        agent.wait_ready()
        run = _storm(storm, scale)
        time.sleep(0.5)  # let the reader drain the ring buffer
    finally:
        code = agent.stop(timeout_s=60)
    if code != 0 or not stats_path.exists():
        raise RuntimeError(f"agent exited {code}: {_tail(agent.output())}")
    stats = AgentProcess.read_stats(stats_path)
    counters = stats["signals"].get(storm.signal)
    if counters is None:
        raise RuntimeError(f"agent stats have no counters for {storm.signal}: {stats['signals']}")
    run.events_seen = int(counters["events_seen"])
    run.records = int(stats["records_received"])
    run.cpu_s = float(stats["cpu_s"]) - float(stats["ready_cpu_s"])
    run.rss_mib = float(stats["max_rss_mib"])
    return run


def _agent_args(policies: Path, playbooks: Path, stats_path: Path) -> list[str]:
    return [
        "--dry-run",
        "--policies",
        str(policies),
        "--playbooks",
        str(playbooks),
        "--stats",
        str(stats_path),
        "--duration",
        "600",
    ]


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # comm may contain spaces; skip past it
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5)


def _bpftrace(storm: Storm, scale: float) -> Run:
    proc = subprocess.Popen(
        ["bpftrace", "-e", storm.bpftrace],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    attached = threading.Event()
    head: list[str] = []
    counted = [0]

    def drain(stream: Sequence[str]) -> None:
        # Read everything so bpftrace never blocks on a full pipe: the map it prints at exit
        # (``@[pid]: count``) is summed into events seen, a cross-check of remedy's count. Only
        # the start is kept, for error messages.
        for line in stream:
            if len(head) < 20:
                head.append(line)
            if line.startswith("Attaching"):
                attached.set()
            elif entry := _MAP_ENTRY.match(line):
                counted[0] += int(entry.group(1))

    reader = threading.Thread(target=drain, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not attached.is_set():
            # Not proc.poll(): it would reap the child, and its rusage (peak RSS) with it.
            if not reader.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"bpftrace did not attach: {''.join(head)[-300:]}")
            attached.wait(0.05)
        # "Attaching N probes..." is printed just before the attach calls; give them time.
        time.sleep(0.5)
        cpu_before = _proc_cpu_s(proc.pid)
        run = _storm(storm, scale)
        run.cpu_s = _proc_cpu_s(proc.pid) - cpu_before
    finally:
        # os.kill, not proc.send_signal(), which polls (reaps) first. Until we reap it the pid
        # cannot be reused, so this signals bpftrace and nothing else.
        os.kill(proc.pid, signal.SIGINT)
        status = _wait4(proc, timeout_s=30)
        reader.join(5)
    code, rusage = status
    if code != 0:
        raise RuntimeError(f"bpftrace exited {code}: {''.join(head)[-300:]}")
    run.rss_mib = rusage.ru_maxrss / 1024  # KiB on Linux
    run.events_seen = counted[0]
    return run


def _wait4(proc: subprocess.Popen[str], timeout_s: float) -> tuple[int, resource.struct_rusage]:
    """Reap ``proc`` with its rusage (peak RSS); SIGKILL it if it outlives ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage
        if time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + timeout_s
        time.sleep(0.05)


def _measure(mode: str, storm: Storm, scale: float, workdir: Path) -> Run:
    try:
        if mode == "none":
            return _storm(storm, scale)
        if mode == "remedy":
            return _remedy(storm, scale, workdir)
        return _bpftrace(storm, scale)
    except Exception as err:  # a failed mode is reported in its row, never crashes the table
        return Run(error=_one_line(f"{type(err).__name__}: {err}"))


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _slowdown(base: float | None, ops_s: float | None) -> float | None:
    """How much longer the same work takes, in percent (negative: faster, i.e. noise)."""
    if not base or not ops_s:
        return None
    return (base / ops_s - 1) * 100


def _cpu_pct(row: Row) -> float | None:
    pcts = [r.cpu_s / r.wall_s * 100 for r in row.ok if r.cpu_s is not None and r.wall_s]
    return statistics.median(pcts) if pcts else None


def _ops_cell(row: Row) -> str:
    """Median ops/s, with the range over rounds: the noise is part of the result."""
    values = [r.ops_s for r in row.ok]
    if not values:
        return ""
    cell = f"{statistics.median(values):,.0f}"
    return cell if len(values) == 1 else f"{cell} ({min(values):,.0f} to {max(values):,.0f})"


def _noise(row: Row) -> float:
    """The no-observer spread over rounds, relative to its median (at least NOISE)."""
    values = [r.ops_s for r in row.ok]
    if len(values) < 2:
        return NOISE
    return max(NOISE, (max(values) - min(values)) / statistics.median(values))


def _table(results: dict[str, dict[str, Row]]) -> str:
    lines = [
        "| storm | mode | ops/s median (range) | slowdown | kernel events seen "
        "| records to user space | observer CPU s (watching) | CPU % of a core | peak RSS MiB "
        "| errors |",
        "|" + "---|" * 10,
    ]
    for storm in STORMS:
        rows = results[storm.name]
        base = rows["none"].median("ops_s")
        for mode in MODES:
            row = rows[mode]
            slow = None if mode == "none" else _slowdown(base, row.median("ops_s"))
            label = "no observer" if mode == "none" else mode
            seen, records = row.median("events_seen"), row.median("records")
            lines.append(
                f"| {storm.name} | {label} | {_ops_cell(row)} | {_fmt(slow, '+.1f', '%')} "
                f"| {_fmt(seen, ',.0f')} | {_fmt(records, ',.0f')} "
                f"| {_fmt(row.median('cpu_s'), '.3f')} | {_fmt(_cpu_pct(row), '.2f', '%')} "
                f"| {_fmt(row.median('rss_mib'), '.1f')} | {row.errors()} |"
            )
    return "\n".join(lines)


def _verdict(remedy: float | None, bpftrace: float | None, noise: float) -> str:
    if not remedy or not bpftrace:
        return ""
    ratio = remedy / bpftrace
    if ratio >= 1:
        return f"yes ({ratio:.2f}x bpftrace's throughput)"
    if ratio >= 1 - noise:
        return f"within noise ({ratio:.2f}x; no-observer runs spread {noise:.0%})"
    return f"NO ({ratio:.2f}x; no-observer runs spread {noise:.0%})"


def _ratios(results: dict[str, dict[str, Row]]) -> str:
    lines = [
        "| storm | remedy slowdown | bpftrace slowdown | remedy no worse than bpftrace? "
        "| remedy CPU % of a core | under 1%? |",
        "|" + "---|" * 6,
    ]
    for storm in STORMS:
        rows = results[storm.name]
        base = rows["none"].median("ops_s")
        remedy, bpftrace = rows["remedy"].median("ops_s"), rows["bpftrace"].median("ops_s")
        pct = _cpu_pct(rows["remedy"])
        lines.append(
            f"| {storm.name} | {_fmt(_slowdown(base, remedy), '+.1f', '%')} "
            f"| {_fmt(_slowdown(base, bpftrace), '+.1f', '%')} "
            f"| {_verdict(remedy, bpftrace, _noise(rows['none']))} "
            f"| {_fmt(pct, '.2f', '%')} | {'' if pct is None else ('yes' if pct < 1 else 'NO')} |"
        )
    return "\n".join(lines)


def _commands(scale: float, workdir: Path) -> str:
    agent = [sys.executable, "-m", "remedy", "run"]
    agent += _agent_args(workdir / "policies-<storm>", workdir / "playbooks", workdir / "s.json")
    lines = [
        "Commands (each storm runs in a fresh cgroup with pids.max "
        f"{PIDS_MAX}; cwd /tmp; ops/s = stress-ng bogo ops / wall s):",
        "",
    ]
    for storm in STORMS:
        lines.append(f"    {storm.name} storm:  {shlex.join(storm.argv(scale))}")
        lines.append(f"    {storm.name} bpftrace: bpftrace -e {shlex.quote(storm.bpftrace)}")
    lines += [
        f"    remedy: {shlex.join(agent)}",
        "      policy: signal <storm's signal>, threshold 1000000 per 1s, dry_run: true, playbook "
        "contain-fork-bomb (armed, never crossed)",
        "      signals: " + ", ".join(f"{s.name}={s.signal}" for s in STORMS),
    ]
    return "\n".join(lines)


def _prepare(workdir: Path) -> None:
    playbooks = workdir / "playbooks"
    playbooks.mkdir()
    shutil.copy(REPO / "playbooks" / "contain-fork-bomb.yaml", playbooks)
    for storm in STORMS:
        policies = workdir / f"policies-{storm.name}"
        policies.mkdir()
        text = _POLICY.format(storm=storm.name, signal=storm.signal)
        (policies / f"{storm.name}.yaml").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per mode")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every storm's ops")
    args = parser.parse_args()
    for tool in ("stress-ng", "bpftrace", "setpriv"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run make setup")
    if os.geteuid() != 0:
        raise SystemExit("bench.signals needs root (BPF programs and cgroups)")
    results = {s.name: {m: Row(m) for m in MODES} for s in STORMS}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="remedy-bench-") as tmp:
        workdir = Path(tmp)
        _prepare(workdir)
        for round_no in range(args.rounds):
            # Rotate the order each round so no mode always runs first (a warm or cold page cache).
            order = MODES[round_no % 3 :] + MODES[: round_no % 3]
            for storm in STORMS:
                for mode in order:
                    run = _measure(mode, storm, args.scale, workdir)
                    results[storm.name][mode].runs.append(run)
                    what = run.error or f"{run.ops_s:,.0f} ops/s in {run.wall_s:.1f} s"
                    print(
                        f"round {round_no + 1}/{args.rounds}: {storm.name} {mode}: {what}",
                        file=sys.stderr,
                    )
        commands = _commands(args.scale, workdir)
    print(commands)
    print(
        f"\nMedians of {args.rounds} interleaved rounds; slowdown = no-observer ops/s over the "
        "mode's ops/s, minus 1; CPU % = observer CPU while watching over the storm's wall time; "
        f"total bench time {time.monotonic() - started:.0f} s.\n"
    )
    print(_table(results))
    print()
    print(_ratios(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
