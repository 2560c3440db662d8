"""TTLs on CLOCK_BOOTTIME within a boot, records of another boot closed as gone, failed reverts
backing off across runs, and a journal that compacts itself (issue 11 item 3). Pure logic: a
fake clock and boot, a fake revert."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from remedy.actions.boot import FakeBoot, Now
from remedy.actions.journal import RETRY_FIRST_S, Journal, JournalBusy, reconcile
from remedy.actions.undo import UndoRecord
from remedy.actions.undoer import Undoer
from remedy.clock import FakeClock
from remedy.errors import CgroupError
from remedy.service.reconcile import EXIT_BUSY, ReconcileOptions, reconcile_once

HOUR = 3600.0


def _record(rid: str, clock: FakeClock, ttl: float = 60.0) -> UndoRecord:
    now = clock.wall()
    return UndoRecord(
        id=rid,
        action="throttle_cpu",
        policy="cpu-hog",
        pid=42,
        start_ticks=7,
        cgroup="/user.slice/app",
        created=now,
        expires=now + ttl,
        previous={"cpu_cores": "max"},
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def boot(clock: FakeClock) -> FakeBoot:
    return FakeBoot(clock, "boot-a")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "undo.jsonl"


def test_records_carry_the_boot_and_boottime(path: Path, clock: FakeClock, boot: FakeBoot) -> None:
    j = Journal(path, clock, boot=boot)
    stamped = j.begin(_record("a", clock))
    assert (stamped.boot_id, stamped.boottime) == ("boot-a", clock.monotonic())
    j.close()
    (line,) = _lines(path)
    assert line["record"]["boot_id"] == "boot-a"
    assert line["record"]["boottime"] == clock.monotonic()
    again = Journal(path, clock, boot=boot)
    assert again.active() == [stamped]
    again.close()


@pytest.mark.parametrize("step", [HOUR, -HOUR])
def test_a_wall_clock_step_neither_extends_nor_cuts_a_ttl(
    path: Path, clock: FakeClock, boot: FakeBoot, step: float
) -> None:
    j = Journal(path, clock, boot=boot)
    j.begin(_record("a", clock, ttl=60))
    clock.wall_offset += step  # NTP or `date -s` moves the wall clock an hour
    assert j.due() == []  # forward: not cut short
    clock.advance(59)
    assert j.due() == []
    clock.advance(1)
    assert [r.id for r in j.due()] == ["a"]  # backward: not extended by an hour
    j.close()


@pytest.mark.parametrize("step", [HOUR, -HOUR])
def test_reconcile_after_a_restart_judges_on_boottime(
    path: Path, clock: FakeClock, boot: FakeBoot, step: float
) -> None:
    j = Journal(path, clock, boot=boot)
    j.begin(_record("a", clock, ttl=60))
    j.close()  # the agent dies
    clock.wall_offset += step
    j = Journal(path, clock, boot=boot)
    assert reconcile(j, lambda r: "ok") == []
    clock.advance(60)
    assert [(r.id, d) for r, d in reconcile(j, lambda r: "ok")] == [("a", "ok")]
    j.close()


def test_a_record_of_another_boot_is_closed_as_gone_untouched(
    path: Path, clock: FakeClock, boot: FakeBoot
) -> None:
    j = Journal(path, clock, boot=boot)
    j.begin(_record("old", clock, ttl=4 * HOUR))
    j.close()
    boot.reboot("boot-b")  # CLOCK_BOOTTIME restarts; the cgroup may now be someone else's
    clock.advance(5)
    j = Journal(path, clock, boot=boot)
    assert [r.id for r in j.other_boot()] == ["old"]
    assert j.due() == []  # never compared with this boot's clock

    def revert(record: UndoRecord) -> str:
        raise AssertionError("a record of another boot must not be reverted")

    ((record, detail),) = reconcile(j, revert)
    assert record.id == "old" and detail.startswith("gone: made in boot boot-a")
    assert j.active() == []
    last = _lines(path)[-1]
    assert (last["op"], last["outcome"]) == ("revert", "gone")
    j.close()


def test_old_records_without_a_boot_still_load_and_use_wall_time(
    path: Path, clock: FakeClock, boot: FakeBoot
) -> None:
    old = _record("old", clock, ttl=60).to_json()
    del old["boot_id"], old["boottime"]  # written before boot ids
    path.write_text(json.dumps({"op": "apply", "record": old, "at": clock.wall()}) + "\n")
    j = Journal(path, clock, boot=boot)
    (record,) = j.active()
    assert record.boot_id == "" and record.boottime is None
    assert j.other_boot() == [] and j.due() == []
    clock.wall_offset += 60  # only the wall clock is known for it
    assert [r.id for r in j.due()] == ["old"]
    j.close()


def test_a_failed_revert_backs_off_across_runs(
    path: Path, clock: FakeClock, boot: FakeBoot
) -> None:
    """A timer running reconcile every second must not append a line per run."""
    j = Journal(path, clock, boot=boot)
    j.begin(_record("a", clock, ttl=1))
    j.close()
    tries: list[float] = []

    def refuse(record: UndoRecord) -> str:
        tries.append(clock.monotonic())
        raise PermissionError("cpu.cfs_quota_us: Permission denied")

    start = clock.monotonic()
    for _ in range(200):  # 200 runs, one a second, each a new process with the journal
        clock.advance(1)
        clock.wall_offset -= 2  # and a wall clock going back does not hold retries off
        j = Journal(path, clock, boot=boot)
        reconcile(j, refuse)
        j.close()
    # 5, 10, 20, 40, 80 s apart: six tries in 200 s, not 200.
    assert [t - start for t in tries] == [1, 6, 16, 36, 76, 156]
    failed = [line for line in _lines(path) if line["op"] == "revert-failed"]
    assert len(failed) == 1 and failed[0]["attempt"] == 6  # compacted on each start
    clock.advance(RETRY_FIRST_S * 2**6)
    j = Journal(path, clock, boot=boot)
    assert [(r.id, d) for r, d in reconcile(j, lambda r: "ok")] == [("a", "ok")]
    j.close()


def test_compaction_bounds_the_file(path: Path, clock: FakeClock, boot: FakeBoot) -> None:
    j = Journal(path, clock, boot=boot, compact_after=16)
    j.begin(_record("kept", clock, ttl=HOUR))
    for n in range(500):
        j.begin(_record(f"r{n}", clock))
        j.reverted(f"r{n}", "recovered")
        if n % 3 == 0:
            j.failed("kept", "ttl expired", f"refused {n}")
        assert len(path.read_text().splitlines()) <= 16 + 2  # the live apply and failure lines
    j.close()
    j = Journal(path, clock, boot=boot)
    assert [r.id for r in j.active()] == ["kept"]
    assert j.failures()["kept"].attempts == len(range(0, 500, 3))
    j.close()


def test_the_journal_compacts_on_start(path: Path, clock: FakeClock, boot: FakeBoot) -> None:
    j = Journal(path, clock, boot=boot)
    for rid in "abc":
        j.begin(_record(rid, clock))
    j.reverted("a", "recovered")
    j.abandon("b", "apply failed")
    j.close()
    assert len(_lines(path)) == 5
    j = Journal(path, clock, boot=boot)
    assert [line["record"]["id"] for line in _lines(path)] == ["c"]
    j.close()


def test_reconcile_refuses_a_journal_an_agent_holds(
    path: Path, clock: FakeClock, boot: FakeBoot, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = Journal(path, clock, boot=boot)
    agent.begin(_record("a", clock, ttl=1))
    clock.advance(10)
    before = path.read_bytes()
    with pytest.raises(JournalBusy):
        Journal(path, clock, boot=boot, lock_wait_s=0)
    opts = ReconcileOptions(path, cgroup_root=Path("/nonexistent"), proc_root=Path("/nonexistent"))
    assert reconcile_once(opts, sys.stdout, clock=clock, boot=boot) == EXIT_BUSY
    assert "in use by another process" in capsys.readouterr().out
    assert path.read_bytes() == before  # nothing touched
    assert [r.id for r in agent.active()] == ["a"]
    agent.close()


def test_reconcile_without_a_journal_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "undo.jsonl"
    assert reconcile_once(ReconcileOptions(path), io.StringIO()) == 0
    assert not path.parent.exists()


def test_now_is_taken_from_the_journal_clocks(clock: FakeClock, boot: FakeBoot, path: Path) -> None:
    j = Journal(path, clock, boot=boot)
    assert j.now() == Now(clock.wall(), "boot-a", clock.monotonic())
    j.close()


class FakeThrottle:
    """A reversible action whose revert records the call, or fails while ``refuse`` is set."""

    name = "throttle_cpu"

    def __init__(self) -> None:
        self.reverted: list[str] = []
        self.refuse = False

    def undo(self, *_args: object, **_kwargs: object) -> UndoRecord:
        raise AssertionError("not applied here")

    def run(self, *_args: object) -> str:
        raise AssertionError("not applied here")

    def revert(self, record: UndoRecord, _ctx: object) -> str:
        if self.refuse:
            raise CgroupError("cpu.cfs_quota_us: Permission denied", cgroup=record.cgroup)
        self.reverted.append(record.id)
        return "restored"


def _undoer(journal: Journal, clock: FakeClock, action: FakeThrottle) -> Undoer:
    return Undoer(journal, None, clock, {"throttle_cpu": action})  # type: ignore[arg-type,dict-item]


@pytest.mark.parametrize("step", [HOUR, -HOUR])
def test_the_agents_tick_ignores_a_wall_clock_step(
    path: Path, clock: FakeClock, boot: FakeBoot, step: float
) -> None:
    action = FakeThrottle()
    undoer = _undoer(Journal(path, clock, boot=boot), clock, action)
    undoer.journal.begin(_record("a", clock, ttl=60))
    clock.wall_offset += step
    clock.advance(59)
    assert undoer.expire() == [] and action.reverted == []
    clock.advance(1)
    assert undoer.expire() == ["throttle_cpu on /user.slice/app: restored"]
    assert action.reverted == ["a"]
    undoer.journal.close()


def test_a_failing_revert_adds_a_line_per_retry_not_per_tick(
    path: Path, clock: FakeClock, boot: FakeBoot
) -> None:
    action = FakeThrottle()
    action.refuse = True
    undoer = _undoer(Journal(path, clock, boot=boot, compact_after=8), clock, action)
    undoer.journal.begin(_record("a", clock, ttl=1))
    appended = 0
    for _ in range(200):  # the engine ticks every second
        clock.advance(1)
        size = path.stat().st_size
        undoer.expire()
        appended += path.stat().st_size != size
        assert len(path.read_text().splitlines()) <= 8 + 2
    assert appended == 6  # at 1, 6, 16, 36, 76 and 156 s
    assert undoer.journal.failures()["a"].attempts == 6
    undoer.journal.close()


def test_a_record_naming_an_unknown_action_stays_applied_and_the_tick_goes_on(
    path: Path, clock: FakeClock, boot: FakeBoot
) -> None:
    action = FakeThrottle()
    undoer = _undoer(Journal(path, clock, boot=boot), clock, action)
    future = replace(_record("future", clock, ttl=1), action="from_a_newer_version")
    undoer.journal.begin(future)
    undoer.journal.begin(_record("known", clock, ttl=1))
    clock.advance(1)
    details = undoer.expire()  # raised KeyError before: the worker died at its first tick
    assert "unknown to this version" in details[1] and "revert failed (attempt 1" in details[1]
    assert action.reverted == ["known"]
    assert [r.id for r in undoer.journal.active()] == ["future"]  # never closed as done
    assert [r.id for r, _why in undoer.stuck()] == ["future"]
    undoer.journal.close()
    undoer = _undoer(Journal(path, clock, boot=boot), clock, action)  # and on the next start
    clock.advance(RETRY_FIRST_S)
    (detail,) = undoer.reconcile()
    assert "unknown to this version" in detail
    assert [r.id for r in undoer.journal.active()] == ["future"]
    undoer.journal.close()


def test_lines_this_version_cannot_read_are_never_compacted_away(
    path: Path, clock: FakeClock, boot: FakeBoot
) -> None:
    newer = _record("newer", clock).to_json() | {"knob_from_the_future": 1}
    foreign = json.dumps({"op": "apply", "record": newer, "at": clock.wall()})
    j = Journal(path, clock, boot=boot, compact_after=4)
    j.begin(_record("a", clock))
    j.reverted("a", "recovered")
    j.close()
    with path.open("a") as f:
        f.write(foreign + "\n")
    j = Journal(path, clock, boot=boot, compact_after=4)  # on start: not compacted
    assert j.active() == []
    for n in range(10):  # nor past the bound
        j.begin(_record(f"r{n}", clock))
        j.reverted(f"r{n}", "recovered")
    j.close()
    assert foreign in path.read_text().splitlines()
