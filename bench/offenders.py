"""The engine's cost per record as distinct offenders pile up (issue 11, item 4).

Feeds ``--count`` (100,000) records, each from a process never seen before, through the real
``Engine`` (policy matching, guards, the state machine, the offender table, audit decisions
built) with a fake identifier, executor and sink: the point is the engine's own cost, not
/proc or cgroupfs. A fake clock moves 1 ms per record and the engine ticks after every record,
as the agent's worker does, so cooldowns end and quiet offenders are released as in a storm.
The policy acts at most 5 times a minute: the rest of the storm is held by the rate limit, as
it would be. Prints a markdown table at 1k, 10k and 100k records: the cost per record over each
segment, offenders tracked, pidfds open, evictions, and the process's RSS.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from remedy.actions.params import FreezeParams
from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import DEFAULT_MAX_OFFENDERS, Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.policy import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.sensors.records import SensorRecord

CHECKPOINTS = (1_000, 10_000, 100_000)
STEP_S = 0.001

PLAYBOOK = Playbook(
    name="freeze", file=Path("bench/freeze.yaml"), steps=(Step("freeze", FreezeParams()),)
)
POLICY = Policy(
    name="fork-bomb",
    file=Path("bench/fork-bomb.yaml"),
    signal="fork_rate",
    threshold=200,
    window_s=1.0,
    playbook="freeze",
    dry_run=False,
    cooldown_s=10.0,
    release_after_s=30.0,
    rate_limit=RateLimit(max_actions=5, per_s=60.0),
    match=Selector(),
)


class Handles:
    """Counts the fake pidfds open, as the kernel would count descriptors."""

    def __init__(self) -> None:
        self.open = 0


@dataclass
class Handle:
    handles: Handles
    closed: bool = False

    def has_exited(self) -> bool:
        return False

    def send_signal(self, sig: int) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.handles.open -= 1


@dataclass
class Identifier:
    handles: Handles = field(default_factory=Handles)

    def identify(self, record: SensorRecord) -> Subject:
        self.handles.open += 1
        pid = record.tgid
        return Subject(
            pid, 1_000 + pid, "forker", 1, "/usr/bin/forker", 1000, False, "/bench", "/cg/bench",
            handle=Handle(self.handles),
        )  # fmt: skip


class Executor:
    def describe(self, step: Step, subject: Subject) -> str:
        return f"freeze pid {subject.pid}"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        return ""

    def release(self, subject: Subject) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.decisions = 0

    def record(self, decision: Decision) -> None:
        self.decisions += 1


def rss_mib() -> float:
    """Resident memory now (VmRSS), not the peak: bounded memory must stay bounded."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(count: int, max_offenders: int) -> list[str]:
    clock, identifier, sink = FakeClock(), Identifier(), Sink()
    engine = Engine(
        PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK}),
        identifier=identifier,
        executor=Executor(),
        sink=sink,
        clock=clock,
        protector=Protector(999_999_999, frozenset({1})),
        max_offenders=max_offenders,
        max_handles=max_offenders,
    )
    rows = [
        f"Engine cap {max_offenders:,} offenders; {count:,} distinct offenders, one record each.",
        "",
        "| records | µs per record (this segment) | offenders tracked | pidfds open "
        "| evicted | refused | RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    checkpoints = sorted({c for c in CHECKPOINTS if c < count} | {count})
    done, previous, started = 0, 0, time.perf_counter()
    for checkpoint in checkpoints:
        while done < checkpoint:
            done += 1
            engine.on_record(SensorRecord("fork_rate", done, done, 1, "forker", 1, 500, 1.0, 0, 0))
            clock.advance(STEP_S)
            engine.tick()
        elapsed = time.perf_counter() - started
        rows.append(
            f"| {checkpoint:,} | {elapsed / (checkpoint - previous) * 1e6:.0f} "
            f"| {sum(1 for _ in engine.offenders()):,} | {identifier.handles.open:,} "
            f"| {engine.stats['offenders-evicted']:,} | {engine.stats['offenders-refused']:,} "
            f"| {rss_mib():.0f} |"
        )
        previous, started = checkpoint, time.perf_counter()
    engine.close()
    rows.append("")
    rows.append(f"{sink.decisions:,} decisions built; {identifier.handles.open} pidfds left open.")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=CHECKPOINTS[-1])
    parser.add_argument("--max-offenders", type=int, default=DEFAULT_MAX_OFFENDERS)
    args = parser.parse_args()
    print("\n".join(run(args.count, args.max_offenders)))


if __name__ == "__main__":
    main()
