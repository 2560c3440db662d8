"""The /proc sampler against a fake process table and a fake clock: no /proc, no sleeping."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from remedy.clock import FakeClock
from remedy.compiler import SensorPlan, SignalPlan, Tier, WindowClass
from remedy.errors import SensorError
from remedy.sensors.catalog import Sensor
from remedy.sensors.records import SensorRecord
from remedy.sensors.sampler import (
    Needs,
    ProcessSnapshot,
    ProcessTable,
    ProcSampler,
    cgroup_key,
)
from testkit.plans import Filter, plan_of

TICK = 0.25


class FakeTable:
    """A process table the test edits between samples. A process added without a create time
    was born 0.01 s before the next sample (one poll advances the clock by TICK)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.procs: dict[int, ProcessSnapshot] = {}
        self.asked: list[Needs] = []

    def sample(self, needs: Needs) -> ProcessTable:
        self.asked.append(needs)
        return ProcessTable(taken_at=self.clock.now, processes=list(self.procs.values()))

    def add(self, pid: int, ppid: int = 1, comm: str = "worker", **kw: Any) -> None:
        kw.setdefault("create_time", self.clock.now + TICK - 0.01)
        self.procs[pid] = ProcessSnapshot(pid=pid, ppid=ppid, comm=comm, **kw)

    def set(self, pid: int, **kw: Any) -> None:
        self.procs[pid] = replace(self.procs[pid], **kw)

    def remove(self, *pids: int) -> None:
        for pid in pids:
            del self.procs[pid]


class Rig:
    """A started sampler over a fake table; ``tick()`` is one poll that samples once."""

    def __init__(self, settings: dict[str, Filter] | SensorPlan, setup: Any = None) -> None:
        self.clock = FakeClock()
        self.table = FakeTable(self.clock)
        self.table.add(1, ppid=0, comm="init", create_time=0.0)
        if setup is not None:
            setup(self.table)
        self.sampler = ProcSampler(
            interval_s=TICK, clock=self.clock, source=self.table, sleep=self.clock.advance
        )
        self.records: list[SensorRecord] = []
        self.sampler.open_ring_buffer(self.records.append)
        self.sampler.start(settings if isinstance(settings, SensorPlan) else plan_of(settings))

    def tick(self) -> list[SensorRecord]:
        before = len(self.records)
        self.sampler.poll(1000)
        return self.records[before:]

    def of(self, signal: str) -> list[SensorRecord]:
        return [r for r in self.records if r.signal == signal]


def one(signal: str, threshold: int, window_s: float = 1.0, **kw: Any) -> dict[str, Filter]:
    return {signal: Filter(window_s=window_s, threshold=threshold, **kw)}


def _spawn(rig: Rig, parent: int, first: int, n: int, **kw: Any) -> list[int]:
    pids = list(range(first, first + n))
    for pid in pids:
        rig.table.add(pid, ppid=parent, **kw)
    return pids


def test_is_a_sensor() -> None:
    sensor: Sensor = ProcSampler(source=FakeTable(FakeClock()))
    assert sensor.kind == "sampler"


# --- fork_rate ------------------------------------------------------------------------------


def test_fork_rate_trips_once_per_window_at_the_threshold() -> None:
    rig = Rig(one("fork_rate", 50), lambda t: t.add(100, comm="bomb", ppid=7))
    assert rig.tick() == []  # nothing new yet
    _spawn(rig, 100, 1000, 30)
    assert rig.tick() == []
    _spawn(rig, 100, 2000, 30)
    (rec,) = rig.tick()
    assert (rec.signal, rec.tgid, rec.pid, rec.ppid, rec.comm) == ("fork_rate", 100, 100, 7, "bomb")
    assert rec.count == 50 and rec.key == 100 and rec.cgroup_id == 0 and rec.sampled
    assert rec.window_s == 1.0 and rec.elapsed_s == pytest.approx(TICK)
    assert rec.ts_boot_ns > 0
    _spawn(rig, 100, 3000, 30)
    assert rig.tick() == []  # same window: already crossed
    rig.tick()  # the window (opened one tick after start) has now run out
    _spawn(rig, 100, 4000, 60)
    assert [r.count for r in rig.tick()] == [50]  # a fresh window, a fresh record
    c = rig.sampler.counters()["fork_rate"]
    assert (c.events_seen, c.records_emitted, c.ringbuf_failed, c.key_init_failed) == (150, 2, 0, 0)


def test_fork_rate_stays_quiet_below_threshold_and_ignores_the_baseline() -> None:
    rig = Rig(one("fork_rate", 50), lambda t: [t.add(p, ppid=100) for p in range(1000, 1100)])
    for i in range(8):  # 10 forks per tick = 40 per 1 s window
        _spawn(rig, 100, 2000 + 10 * i, 10)
        assert rig.tick() == []


def test_fork_rate_cgroup_sums_many_parents_of_one_cgroup() -> None:
    def setup(t: FakeTable) -> None:
        for parent in range(100, 110):
            t.add(parent, comm=f"p{parent}", cgroup="/bomb.slice")
        t.add(200, comm="other", cgroup="/other.slice")

    rig = Rig(one("fork_rate_cgroup", 40), setup)
    for i, parent in enumerate(range(100, 110)):
        _spawn(rig, parent, 1000 + 10 * i, 5, cgroup="/bomb.slice")  # 5 each: no single offender
    _spawn(rig, 200, 5000, 39, cgroup="/other.slice")
    (rec,) = rig.tick()
    assert rec.key == cgroup_key("/bomb.slice") and rec.count == 40 and rec.cgroup_id == 0
    assert rig.sampler.cgroup_path(rec.key) == "/bomb.slice"
    assert rec.tgid == 107 and rec.comm == "p107"  # the parent whose child tipped the window


# --- exec_rate ------------------------------------------------------------------------------


def test_exec_rate_counts_children_that_changed_name() -> None:
    rig = Rig(
        {
            "exec_rate": Filter(window_s=1.0, threshold=20),
            "exec_rate_cgroup": Filter(window_s=1.0, threshold=20),
        },
        lambda t: t.add(100, comm="supervisor", cgroup="/app"),
    )
    _spawn(rig, 100, 1000, 30, comm="supervisor", cgroup="/app")  # forks without exec
    _spawn(rig, 100, 2000, 19, comm="crashy", cgroup="/app")
    assert rig.tick() == []
    rig.table.set(1000, comm="crashy")  # a known child execs between samples
    got = {r.signal: r for r in rig.tick()}
    assert got["exec_rate"].tgid == 100 and got["exec_rate"].count == 20
    assert got["exec_rate_cgroup"].key == cgroup_key("/app")


# --- churn ----------------------------------------------------------------------------------


def test_churn_counts_young_children_that_vanished() -> None:
    rig = Rig(one("churn", 10, lifetime_s=0.1), lambda t: t.add(100, comm="looper"))
    first = _spawn(rig, 100, 1000, 5)  # each seen once, 0.01 s old
    old = _spawn(rig, 100, 2000, 10, create_time=rig.clock.now - 5.0)
    assert rig.tick() == []
    rig.table.remove(*first, *old)  # the old ones are not churn
    second = _spawn(rig, 100, 3000, 5)
    assert rig.tick() == []
    rig.table.remove(*second[:4])
    rig.table.set(second[4], zombie=True)  # exited, not yet reaped
    (rec,) = rig.tick()
    assert (rec.tgid, rec.key, rec.comm, rec.count) == (100, 100, "looper", 10)


def test_churn_ignores_children_that_outlive_the_sample_after_their_birth() -> None:
    rig = Rig(one("churn", 1, lifetime_s=0.1), lambda t: t.add(100))
    kids = _spawn(rig, 100, 1000, 5)
    rig.tick()
    rig.tick()  # still there: at least 0.26 s old
    rig.table.remove(*kids)
    assert rig.tick() == []


def test_churn_counts_a_child_first_seen_as_a_young_zombie() -> None:
    rig = Rig(one("churn", 2, lifetime_s=0.1), lambda t: t.add(100))
    _spawn(rig, 100, 1000, 2, zombie=True)
    assert [r.count for r in rig.tick()] == [2]


# --- cpu --------------------------------------------------------------------------------------


def _cpu_rig(threshold: int, sustain: int = 1) -> Rig:
    return Rig(
        one("cpu", threshold, sustain=sustain),
        lambda t: [t.add(100, comm="spin", cpu_s=0.0), t.add(101, comm="half", cpu_s=0.0)],
    )


def _burn(rig: Rig, ticks: int, spin: float = 1.0) -> list[SensorRecord]:
    out = []
    for _ in range(ticks):
        rig.table.set(100, cpu_s=rig.table.procs[100].cpu_s + TICK * spin)  # type: ignore[operator]
        rig.table.set(101, cpu_s=rig.table.procs[101].cpu_s + TICK * 0.5)  # type: ignore[operator]
        out += rig.tick()
    return out


def test_cpu_trips_on_percent_of_a_core_over_the_window() -> None:
    rig = _cpu_rig(90)
    recs = _burn(rig, 4)
    assert [(r.tgid, r.comm, r.count) for r in recs] == [(100, "spin", 100)]
    assert recs[0].elapsed_s == pytest.approx(0.75)  # 4 samples, 1 s of CPU
    assert [r.tgid for r in _burn(rig, 8)] == [100, 100]  # once per window, never the 50% one


def test_cpu_needs_sustain_consecutive_windows() -> None:
    rig = _cpu_rig(90, sustain=3)
    assert _burn(rig, 8) == []  # two crossing windows
    assert len(_burn(rig, 4)) == 1  # the third
    assert len(_burn(rig, 4)) == 1  # and every one after, while it lasts
    _burn(rig, 4, spin=0.5)  # a quiet window breaks the streak
    assert _burn(rig, 8) == []
    assert len(_burn(rig, 4)) == 1


# --- rss, open_rate, fd_growth, connect_rate ---------------------------------------------


def test_rss_level_once_per_window() -> None:
    mib = 1 << 20
    rig = Rig(
        one("rss", 100),
        lambda t: [t.add(100, rss_anon=10 * mib), t.add(101, rss_anon=99 * mib + mib - 1)],
    )
    rig.table.set(100, rss_anon=150 * mib)
    (rec,) = rig.tick()
    assert (rec.tgid, rec.count) == (100, 150)
    assert [rig.tick() for _ in range(3)] == [[], [], []]
    assert [r.count for r in rig.tick()] == [150]


def test_open_rate_counts_growth_and_fd_growth_the_net_change() -> None:
    rig = Rig(
        {
            "open_rate": Filter(window_s=1.0, threshold=100),
            "fd_growth": Filter(window_s=1.0, threshold=100),
        },
        lambda t: t.add(100, num_fds=10),
    )
    for fds in (70, 20, 80, 20):  # opens 120 in the window, but closes them again
        rig.table.set(100, num_fds=fds)
        rig.tick()
    assert [r.signal for r in rig.records] == ["open_rate"]
    assert rig.records[0].count == 120
    rig.records.clear()
    for fds in (60, 100, 130, 140):  # a leak: +110 net by the third sample of a new window
        rig.table.set(100, num_fds=fds)
        rig.tick()
    assert {r.signal: r.count for r in rig.records} == {"open_rate": 110, "fd_growth": 110}


def test_connect_rate_counts_new_connections_and_is_read_only_when_configured() -> None:
    rig = Rig(one("connect_rate", 5), lambda t: t.add(100, connections=frozenset({"a", "b"})))
    assert rig.table.asked[-1].connections and not rig.table.asked[-1].fds
    rig.table.set(100, connections=frozenset({"b", "c", "d"}))
    assert rig.tick() == []
    rig.table.set(100, connections=frozenset({"e", "f", "g"}))
    (rec,) = rig.tick()
    assert (rec.tgid, rec.count) == (100, 5)
    quiet = Rig(one("fork_rate", 5))
    assert quiet.table.asked == [Needs()]


# --- identity, configure, polling -------------------------------------------------------------


def test_a_reused_pid_starts_fresh() -> None:
    rig = Rig(one("fork_rate", 20), lambda t: t.add(100, comm="old"))
    _spawn(rig, 100, 1000, 15)
    assert rig.tick() == []
    rig.table.remove(100)
    rig.table.add(100, comm="new")  # same pid, a later create_time
    _spawn(rig, 100, 2000, 15)
    assert rig.tick() == []  # 15 + 15, but for two different processes
    _spawn(rig, 100, 3000, 5)
    (rec,) = rig.tick()
    assert (rec.comm, rec.count) == ("new", 20)


def test_a_reused_pid_is_not_the_parent_of_older_children() -> None:
    rig = Rig(one("fork_rate", 1))
    rig.table.add(100, create_time=rig.clock.now + 0.2)  # started after the child below
    rig.table.add(1000, ppid=100, create_time=rig.clock.now + 0.1)
    (rec,) = [r for r in rig.tick() if r.key == 100]
    assert (rec.tgid, rec.comm, rec.ppid) == (100, "", 0)  # named by pid only: parent unknown


def test_configure_changes_thresholds_live() -> None:
    rig = Rig(one("fork_rate", 50), lambda t: t.add(100))
    _spawn(rig, 100, 1000, 30)
    assert rig.tick() == []
    rig.sampler.configure(plan_of(one("fork_rate", 35)))
    _spawn(rig, 100, 2000, 10)
    assert [r.count for r in rig.tick()] == [35]  # the open window kept its 30
    rig.sampler.configure(plan_of(one("fork_rate", 1000)))
    for i in range(8):
        _spawn(rig, 100, 3000 + 100 * i, 100)
        assert rig.tick() == []
    with pytest.raises(SensorError, match="not started"):
        rig.sampler.configure(plan_of(one("cpu", 50)))
    with pytest.raises(SensorError, match="threshold"):
        rig.sampler.configure(plan_of(one("fork_rate", 0)))


def test_start_rejects_unknown_signals() -> None:
    sampler = ProcSampler(source=FakeTable(FakeClock()))
    with pytest.raises(SensorError, match="unknown signal 'forks'"):
        sampler.start(plan_of(one("forks", 1)))


def test_poll_waits_for_the_next_sample_within_its_timeout() -> None:
    rig = Rig(one("fork_rate", 1), lambda t: t.add(100))
    _spawn(rig, 100, 1000, 1)
    rig.sampler.poll(100)  # 0.1 s of the 0.25 s interval
    assert rig.records == [] and len(rig.table.asked) == 1
    assert rig.clock.now == pytest.approx(1000.1)
    rig.sampler.poll(1000)
    assert len(rig.records) == 1 and rig.clock.now == pytest.approx(1000.25)
    rig.sampler.close()
    with pytest.raises(SensorError):
        rig.sampler.poll(0)


# --- issue 12: tiers, window classes, cgroup-scoped tiers, holds, rss_growth ---------------------


def tiered(
    signal: str, *classes: tuple[float, tuple[Tier, ...]], generation: int = 3
) -> SensorPlan:
    return SensorPlan(
        {
            signal: SignalPlan(
                signal, tuple(WindowClass(i, w, t) for i, (w, t) in enumerate(classes))
            )
        },
        generation,
    )


WARN_CONTAIN = tiered("fork_rate", (1.0, (Tier(1, "warn", 10), Tier(2, "contain", 30))))


def test_a_key_emits_once_per_window_and_tier_naming_rule_and_generation() -> None:
    rig = Rig(WARN_CONTAIN, lambda t: t.add(100))
    _spawn(rig, 100, 1000, 12)
    assert [(r.rule, r.generation, r.count) for r in rig.tick()] == [(1, 3, 10)]
    _spawn(rig, 100, 2000, 20)
    assert [(r.rule, r.count) for r in rig.tick()] == [(2, 30)]  # a higher tier: again
    _spawn(rig, 100, 3000, 12)
    assert rig.tick() == []  # both tiers emitted in this window
    rig.clock.advance(1.0)
    _spawn(rig, 100, 4000, 40)
    assert [r.rule for r in rig.tick()] == [1, 2]  # a new window: each tier once more


def test_a_held_incident_emits_only_tiers_not_yet_emitted_until_unheld() -> None:
    rig = Rig(WARN_CONTAIN, lambda t: t.add(100))
    _spawn(rig, 100, 1000, 12)
    [warn] = rig.tick()
    rig.sampler.hold(warn)
    assert rig.sampler.measure(warn) == 12
    rig.clock.advance(1.0)
    _spawn(rig, 100, 2000, 35)
    # The warning tier is not re-emitted while held; the contain tier was never emitted: it is.
    emitted = rig.tick()
    assert [(r.rule, r.count) for r in emitted] == [(2, 30)]  # at its 30th fork
    assert rig.sampler.measure(warn) == 35  # the engine re-measures instead
    rig.sampler.hold(emitted[0])  # the contain policy's own incident
    rig.clock.advance(1.0)
    _spawn(rig, 100, 3000, 40)
    assert rig.tick() == []  # both held: nothing more for this key
    rig.sampler.unhold(warn)  # one policy's incident ends: only its tier emits again
    rig.clock.advance(1.0)
    _spawn(rig, 100, 4000, 40)
    assert [r.rule for r in rig.tick()] == [1]
    rig.sampler.unhold(emitted[0])
    rig.clock.advance(1.0)
    _spawn(rig, 100, 5000, 40)
    assert [r.rule for r in rig.tick()] == [1, 2]


def test_measure_is_zero_once_the_window_ended_quiet() -> None:
    rig = Rig(WARN_CONTAIN, lambda t: t.add(100))
    _spawn(rig, 100, 1000, 12)
    [warn] = rig.tick()
    rig.clock.advance(1.5)
    assert rig.sampler.measure(warn) == 0
    assert rig.sampler.measure(replace(warn, rule=99)) is None  # a rule the plan has not


def test_window_classes_count_separately() -> None:
    plan = tiered("fork_rate", (1.0, (Tier(1, "fast", 30),)), (5.0, (Tier(2, "slow", 50),)))
    rig = Rig(plan, lambda t: t.add(100))
    for i in range(5):
        _spawn(rig, 100, 1000 + 100 * i, 12)
        rig.tick()
        rig.clock.advance(0.75)  # one second a step: 12 a second never reaches 30
    assert [(r.rule, r.window_s) for r in rig.records] == [(2, 5.0)]


def test_a_cgroup_scoped_tier_applies_only_to_processes_of_matching_cgroups() -> None:
    plan = tiered("fork_rate", (1.0, (Tier(1, "ci", 10, cgroups=("/ci/*",)), Tier(2, "all", 30))))

    def setup(t: FakeTable) -> None:
        t.add(100, cgroup="/ci/job-1")
        t.add(200, cgroup="/web")
        t.add(300, cgroup="/ci")  # fnmatchcase: "/ci/*" does not match "/ci"

    rig = Rig(plan, setup)
    assert rig.table.asked[-1].cgroup  # cgroups are read because a tier matches on them
    for parent, cgroup in ((100, "/ci/job-1"), (200, "/web"), (300, "/ci")):
        _spawn(rig, parent, parent * 10, 15, cgroup=cgroup)
    assert [(r.key, r.rule) for r in rig.tick()] == [(100, 1)]
    for parent, cgroup in ((100, "/ci/job-1"), (200, "/web"), (300, "/ci")):
        _spawn(rig, parent, parent * 100, 20, cgroup=cgroup)
    assert sorted((r.key, r.rule) for r in rig.tick()) == [(100, 2), (200, 2), (300, 2)]


def test_rss_growth_is_mib_gained_since_the_windows_start() -> None:
    plan = tiered("rss_growth", (2.0, (Tier(1, "leak", 50),)))
    mib = 1 << 20
    rig = Rig(plan, lambda t: t.add(100, rss_anon=900 * mib))
    assert rig.table.asked[-1].rss
    rig.tick()  # the window opens at 900 MiB: a big process is no leak
    rig.table.set(100, rss_anon=940 * mib)
    assert rig.tick() == []
    rig.table.set(100, rss_anon=960 * mib)
    [rec] = rig.tick()
    assert (rec.signal, rec.count, rec.rule) == ("rss_growth", 60, 1)
