"""Replay a recorded trace through the real engine: test a policy before it touches a host.

The engine is the one the agent runs, with four things swapped for replay:

* the clock is a :class:`~remedy.clock.FakeClock` moved to each entry's ``t`` (its wall clock
  starts at the trace's ``recorded_at``, so silences are judged as on the day of recording);
* the identifier hands back the Subject the recorder identified (ProcessGone when it had gone,
  or when a replayed ``kill`` ended it: its later records would never have been made);
* the executor describes each step with the real action's ``describe()`` against a cgroup v2
  driver rooted at ``/sys/fs/cgroup`` (only its paths are used) and "runs" a step by noting it;
* the protector knows no agent (pid 0, no ancestors): the recording agent is not running here.

Enforcement is on (``dry_run=False``), so the timeline shows what enforcement would have done,
including cooldowns, escalation, rate limits and breakers; a policy with ``dry_run: true`` still
says "would-act". Nothing on this host is read or touched.

The kernel filter is emulated from the trace: a record crossed the recording's thresholds, so a
policy with a higher threshold (same window) keeps a record only if the record's rate, kept up
for the whole window, reaches it (level signals: if the recorded level reaches it). A lower
threshold, another window or a signal that was not recorded cannot be told from the trace; the
output says so in a ``note:`` line and replays the records as they are.

Output is deterministic: the same trace and policies give byte-identical output.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV2Driver
from remedy.actions.registry import ACTIONS
from remedy.clock import FakeClock
from remedy.compiler import SensorPlan
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import ProcessGone, RemedyError
from remedy.policy import Policy, PolicySet, Step, load_policy_set
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS, Mode, SignalSettings
from remedy.sensors.records import SensorRecord
from remedy.sensors.startup import legacy_settings
from remedy.tools.trace import TraceEntry, TraceHeader, read_trace

__all__ = [
    "DIVERGED",
    "HEADLINE",
    "Divergence",
    "Replay",
    "ReplayExecutor",
    "TraceIdentifier",
    "compare",
    "crossing",
    "main",
    "replay",
]

HEADLINE = "replay: what enforcement would have done"
DIVERGED = 3  # exit code of `remedy replay --against` when the two policy sets disagree
_START = 1000.0  # the fake monotonic clock's origin; t = 0 is here
_CGROUP_ROOT = Path("/sys/fs/cgroup")


# Steps after which the process is taken to have exited: its later records are dropped as
# ProcessGone, as they would never have been made. Anything else (a quarantine) is assumed to
# leave the recorded behaviour unchanged: the trace cannot tell how a capped process behaves.
ENDS_PROCESS = frozenset({"kill"})


@dataclass
class _ReplayHandle:
    """A pinned process in replay: it has exited once a replayed step ended it."""

    key: tuple[int, int]
    ended: set[tuple[int, int]]

    def has_exited(self) -> bool:
        return self.key in self.ended

    def send_signal(self, sig: int) -> None:
        """Never signals anything."""

    def close(self) -> None:
        """Nothing to close."""


class TraceIdentifier:
    """Returns the Subject recorded for the entry being replayed (set ``entry`` first)."""

    def __init__(self, ended: set[tuple[int, int]] | None = None) -> None:
        self.entry: TraceEntry | None = None
        self.ended = ended if ended is not None else set()

    def identify(self, record: SensorRecord) -> Subject:
        if self.entry is None or self.entry.subject is None:
            raise ProcessGone("exited before identification (recorded)", pid=record.tgid)
        subject = self.entry.subject
        if subject.key in self.ended:
            raise ProcessGone("ended by an earlier replayed step", pid=subject.pid)
        # A fresh copy each time, with a handle that can only say whether replay ended it.
        return dataclasses.replace(subject, handle=_ReplayHandle(subject.key, self.ended))


class ReplayExecutor:
    """Describes steps with the real actions; "runs" them by writing them down."""

    def __init__(self, quarantine_root: str = "/remedy") -> None:
        procfs = ProcFS(Path("/nonexistent/proc"))  # never read: describe() uses paths only
        self._ctx = ActionContext(CgroupV2Driver(_CGROUP_ROOT, procfs), procfs, quarantine_root)
        self.executed: list[tuple[str, int, str]] = []  # (action, pid, policy)
        self.ended: set[tuple[int, int]] = set()  # (pid, start_ticks) a replayed step ended

    def describe(self, step: Step, subject: Subject) -> str:
        action = ACTIONS.get(step.action)
        if action is None:
            return f"{step.action} (not described in replay)"
        try:
            return action.describe(step.params, subject, self._ctx)
        except (RemedyError, OSError) as err:
            return f"{step.action} (not described in replay: {err})"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        self.executed.append((step.action, subject.pid, policy.name))
        if step.action in ENDS_PROCESS:
            self.ended.add(subject.key)
        return "replayed"

    def release(self, subject: Subject) -> None:
        """Nothing was created, so nothing is removed."""


@dataclass
class _Sink:
    """Collects decisions with the trace time they were made at."""

    t: float = 0.0
    decisions: list[tuple[float, Decision]] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append((self.t, decision))


def crossing(
    record: SensorRecord, recorded: SignalSettings | None, wanted: SignalSettings
) -> SensorRecord | None:
    """The record as the replayed funnel would have sent it, or None if it would not have
    crossed. Exact for the recorded settings; an estimate for a higher threshold."""
    if recorded is None or wanted.window_s != recorded.window_s:
        return record
    if wanted.threshold <= recorded.threshold:
        return record
    if SIGNALS[record.signal].mode == Mode.LEVEL:
        return record if record.count >= wanted.threshold else None
    if record.elapsed_s <= 0:
        return dataclasses.replace(record, count=wanted.threshold)
    projected = record.count * record.window_s / record.elapsed_s
    if projected < wanted.threshold:
        return None
    elapsed = record.elapsed_s * wanted.threshold / record.count
    return dataclasses.replace(record, count=wanted.threshold, elapsed_s=elapsed)


def _crossings(record: SensorRecord, header: TraceHeader, plan: SensorPlan) -> list[SensorRecord]:
    """The records the replayed plan's funnel would have sent for a recorded one: one per tier
    of its signal that it crosses, naming that tier's rule in this plan's generation (so the
    engine routes by rule, as it does live)."""
    sp = plan.signals.get(record.signal)
    if sp is None:
        return []
    recorded = header.signals.get(record.signal)
    out = []
    for cls, tier in sp.tiers():
        wanted = SignalSettings(cls.window_s, tier.threshold, tier.sustain, sp.lifetime_s)
        crossed = crossing(record, recorded, wanted)
        if crossed is not None:
            out.append(dataclasses.replace(crossed, rule=tier.rule, generation=plan.generation))
    return out


def _describe(name: str, s: SignalSettings) -> str:
    sustain = f" for {s.sustain} windows" if s.sustain > 1 else ""
    return f"{name} ≥ {s.threshold:,} {SIGNALS[name].noun} per {s.window_s:g} s{sustain}"


def _notes(header: TraceHeader, wanted: Mapping[str, SignalSettings]) -> list[str]:
    """What the trace cannot tell about these policies."""
    notes = []
    for name, s in sorted(wanted.items()):
        got = header.signals.get(name)
        if got is None:
            notes.append(f"{name} was not recorded: these policies see no records for it")
        elif s.window_s != got.window_s or s.sustain != got.sustain:
            notes.append(
                f"{_describe(name, s)}: recorded as {_describe(name, got)}; "
                "records replayed as recorded"
            )
        elif s.threshold < got.threshold:
            notes.append(
                f"{_describe(name, s)}: recorded at {got.threshold:,}; processes between "
                "the two thresholds are missing from the trace"
            )
        elif s.threshold > got.threshold:
            notes.append(
                f"{_describe(name, s)}: recorded at {got.threshold:,}; crossings estimated "
                "from each record's rate"
            )
    return notes


@dataclass
class Replay:
    """One policy set run over one trace."""

    policies: PolicySet
    decisions: list[tuple[float, Decision]]
    notes: list[str]
    records: int = 0  # trace entries
    crossed: int = 0  # of which crossed these policies' funnel
    executed: list[tuple[str, int, str]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def replay(
    header: TraceHeader,
    entries: Sequence[TraceEntry],
    policies: PolicySet,
    *,
    quarantine_root: str = "/remedy",
) -> Replay:
    """Run the real engine over ``entries``; ticks between entries and, at the end, past every
    cooldown and release, so the last offenders are released as the agent would."""
    clock = FakeClock(start=_START, wall_offset=header.recorded_epoch)
    executor = ReplayExecutor(quarantine_root)
    identifier = TraceIdentifier(executor.ended)
    sink = _Sink()
    engine = Engine(
        policies,
        identifier=identifier,
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(agent_pid=0, agent_ancestors=frozenset()),
        dry_run=False,
    )
    plan = engine.plan
    wanted = legacy_settings(plan)
    result = Replay(policies, sink.decisions, _notes(header, wanted), records=len(entries))

    def move_to(t: float) -> None:
        sink.t = t
        clock.advance(max(0.0, _START + t - clock.now))

    try:
        for entry in entries:
            move_to(entry.t)
            engine.tick()
            crossings = _crossings(entry.record, header, plan)
            if not crossings:
                continue
            result.crossed += 1
            identifier.entry = entry
            for record in crossings:  # one per tier it crosses, as the tiered funnel sends
                engine.on_record(record)
            identifier.entry = None
            engine.tick()
        last = entries[-1].t if entries else 0.0
        tail = max((p.release_after_s + p.cooldown_s for p in policies.policies), default=0.0)
        move_to(last + tail + 1.0)
        engine.tick()
    finally:
        engine.close()
    result.executed = executor.executed
    result.stats = dict(sorted(engine.stats.items()))
    return result


# --- comparing -------------------------------------------------------------------------------

_Key = tuple[float, int, str]  # (t, pid, signal): policies may be renamed between the sets


@dataclass(frozen=True)
class Divergence:
    """Where the two sets decided differently about one record of one process."""

    t: float
    pid: int
    comm: str
    signal: str
    base: tuple[tuple[str, str | None], ...]  # (outcome, action) in emission order
    against: tuple[tuple[str, str | None], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "pid": self.pid,
            "comm": self.comm,
            "signal": self.signal,
            "base": [list(x) for x in self.base],
            "against": [list(x) for x in self.against],
        }

    def line(self) -> str:
        def say(side: tuple[tuple[str, str | None], ...]) -> str:
            return ", ".join(f"{o} {a or '-'}" for o, a in side) or "nothing"

        return (
            f"+{self.t:.3f}s pid {self.pid} ({self.comm}) {self.signal}: "
            f"base {say(self.base)}; against {say(self.against)}"
        )


def _by_key(
    decisions: Sequence[tuple[float, Decision]],
) -> dict[_Key, list[Decision]]:
    out: dict[_Key, list[Decision]] = {}
    for t, d in decisions:
        out.setdefault((t, d.pid, d.signal), []).append(d)
    return out


def compare(base: Replay, against: Replay) -> list[Divergence]:
    """Decisions present in one and not the other, or with another outcome or action for the
    same (t, pid, signal); sorted by time, pid, signal."""
    a, b = _by_key(base.decisions), _by_key(against.decisions)
    out = []
    for key in sorted(set(a) | set(b)):
        left = tuple((d.outcome, d.action) for d in a.get(key, []))
        right = tuple((d.outcome, d.action) for d in b.get(key, []))
        if left != right:
            comm = (a.get(key) or b[key])[0].comm
            out.append(Divergence(key[0], key[1], comm, key[2], left, right))
    return out


# --- output ----------------------------------------------------------------------------------


def _policies_line(policies: PolicySet) -> str:
    return "; ".join(
        f"{p.name} ({_describe(p.signal, _settings_of(p))}, {p.mode}, "
        f"playbook {p.playbook}: {' → '.join(s.action for s in policies.playbook_for(p).steps)})"
        for p in policies.policies
    )


def _settings_of(policy: Policy) -> SignalSettings:
    return SignalSettings(policy.window_s, policy.threshold, policy.sustain, policy.lifetime_s)


def _counts(r: Replay) -> str:
    counts = Counter(d.outcome for _, d in r.decisions)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _timeline(r: Replay) -> list[str]:
    return [
        f"+{t:.3f}s [{d.policy}] {d.outcome} {d.action or '-'} {d.pid} {d.comm}: {d.message}"
        for t, d in r.decisions
    ]


def _summary(r: Replay) -> str:
    return (
        f"{len(r.decisions)} decision(s) ({_counts(r)}) from {r.crossed} of {r.records} "
        f"record(s); {len(r.executed)} action(s) would have run"
    )


def _trace_line(name: str, header: TraceHeader, entries: Sequence[TraceEntry]) -> str:
    gone = sum(e.subject is None for e in entries)
    watched = ", ".join(_describe(n, s) for n, s in sorted(header.signals.items()))
    return (
        f"trace: {name}: {len(entries)} record(s) ({gone} gone before identification), "
        f"recorded {header.recorded_at} on {header.host}; funnel {watched}"
    )


def render_text(
    name: str,
    header: TraceHeader,
    entries: Sequence[TraceEntry],
    base: Replay,
    against: Replay | None = None,
) -> str:
    lines = [HEADLINE, _trace_line(name, header, entries)]
    if against is None:
        lines.append(f"policies: {_policies_line(base.policies)}")
        lines += [f"note: {n}" for n in base.notes]
        lines += _timeline(base)
        lines.append(f"summary: {_summary(base)}")
        return "\n".join(lines) + "\n"
    lines.append(f"base: {_policies_line(base.policies)}")
    lines.append(f"against: {_policies_line(against.policies)}")
    lines += [f"note (base): {n}" for n in base.notes]
    lines += [f"note (against): {n}" for n in against.notes]
    lines.append(f"base: {_summary(base)}")
    lines.append(f"against: {_summary(against)}")
    divergences = compare(base, against)
    if not divergences:
        lines.append("identical: both policy sets decide the same on every record")
    else:
        lines.append(f"diverged: {len(divergences)} difference(s)")
        lines += [f"  {d.line()}" for d in divergences]
    return "\n".join(lines) + "\n"


def _replay_json(r: Replay) -> dict[str, Any]:
    return {
        "policies": [p.name for p in r.policies.policies],
        "notes": r.notes,
        "records": r.records,
        "crossed": r.crossed,
        "decisions": [{"t": round(t, 6), **d.to_json()} for t, d in r.decisions],
        "executed": [list(x) for x in r.executed],
    }


def render_json(
    name: str,
    header: TraceHeader,
    entries: Sequence[TraceEntry],
    base: Replay,
    against: Replay | None = None,
) -> str:
    doc: dict[str, Any] = {
        "replay": HEADLINE.removeprefix("replay: "),
        "trace": {"file": name, "entries": len(entries), **header.to_json()},
        "base": _replay_json(base),
    }
    if against is not None:
        doc["against"] = _replay_json(against)
        doc["divergences"] = [d.to_json() for d in compare(base, against)]
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _load(policies: Sequence[Path], playbooks: Sequence[Path]) -> PolicySet:
    # Replay acts on nothing, so files need not be root-owned (CI runs it unprivileged).
    return load_policy_set(tuple(policies), tuple(playbooks), require_secure=False)


def main(
    trace: Path,
    policies: Sequence[Path],
    playbooks: Sequence[Path] = (),
    *,
    against: Sequence[Path] = (),
    against_playbooks: Sequence[Path] = (),
    fmt: Literal["text", "json"] = "text",
    quarantine_root: str = "/remedy",
    out: TextIO,
) -> int:
    """``remedy replay``: 0 when done (with ``against``: when both sets decide the same),
    :data:`DIVERGED` when they do not. Raises TraceError / ConfigErrors on bad input."""
    header, entries = read_trace(trace)
    base = replay(header, entries, _load(policies, playbooks), quarantine_root=quarantine_root)
    other = None
    if against:
        other = replay(
            header, entries, _load(against, against_playbooks), quarantine_root=quarantine_root
        )
    render = render_json if fmt == "json" else render_text
    out.write(render(trace.name, header, entries, base, other))
    if other is not None and compare(base, other):
        return DIVERGED
    return 0
