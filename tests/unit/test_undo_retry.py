"""A revert that cannot restore is never closed as done: it stays in the journal, is retried
with backoff, and is visible (issue 10 item 6). Pure logic: a fake v1 driver, a fake clock."""

from __future__ import annotations

from pathlib import Path

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import Limits
from remedy.actions.journal import Journal
from remedy.actions.quarantine import Quarantine
from remedy.actions.undo import UndoRecord
from remedy.actions.undoer import RETRY_FIRST_S, RETRY_MAX_S, Undoer, retry_delay
from remedy.clock import FakeClock
from remedy.errors import CgroupError
from remedy.proc import ProcFS

Q = "/remedy/q-42-7"
HOMES = {"pids": "/system.slice/app.service", "cpu": "/", "memory": "/system.slice"}


class HalfMovedBack:
    """A v1 host where pid 42 is already home in the pids hierarchy but still in the
    quarantine in cpu and memory: what a revert that failed half way left behind. Its cpu
    home cannot be written to until ``fixed``."""

    version = 1
    root = Path("/fake")

    def __init__(self) -> None:
        self.where = {"pids": HOMES["pids"], "cpu": Q, "memory": Q}
        self.fixed = False
        self.removed: list[str] = []

    def display_path(self, rel: str) -> str:
        return f"/fake/pids{rel}"

    def exists(self, rel: str) -> bool:
        return rel == Q and not self.removed  # the pids directory is still there, empty

    def members(self, rel: str) -> list[int]:  # pids hierarchy only
        return [42] if rel == Q and self.where["pids"] == Q else []

    def members_anywhere(self, rel: str) -> list[int]:
        return [42] if Q in self.where.values() else []

    def read_knobs(self, rel: str, knobs: object) -> dict[str, str]:
        raise CgroupError("not in the freezer hierarchy", cgroup=rel)

    def apply(self, rel: str, limits: Limits) -> None:
        raise AssertionError("nothing to write")

    def move(self, pid: int, rel: str) -> None:
        for h in self.where:  # a move by one path in every hierarchy (the old way)
            if h == "pids" or self.fixed:
                self.where[h] = rel

    def restore(self, pid: int, rel: str, origins: dict[str, str]) -> None:
        for h, now in self.where.items():
            if now == rel and (h != "cpu" or self.fixed):
                self.where[h] = origins[h]
        if rel in self.where.values():
            raise CgroupError("still in the quarantine in the cpu hierarchy", pid=pid)

    def remove(self, rel: str) -> None:
        if rel in self.where.values():
            raise CgroupError("still has processes", cgroup=rel)
        self.removed.append(rel)


def _record(clock: FakeClock) -> UndoRecord:
    return UndoRecord(
        id="q1",
        action="quarantine",
        policy="fork-bomb",
        pid=42,
        start_ticks=7,
        cgroup=Q,
        created=clock.wall(),
        expires=clock.wall() + 10,
        original_cgroup=HOMES["pids"],
        pids=(42,),
        origins={"42": dict(HOMES)},
    )


def _undoer(path: Path, clock: FakeClock, driver: HalfMovedBack) -> Undoer:
    ctx = ActionContext(driver, ProcFS(), "/remedy")  # type: ignore[arg-type]
    return Undoer(Journal(path, clock), ctx, clock, {"quarantine": Quarantine()})


def test_a_revert_that_leaves_a_task_in_the_quarantine_stays_open(tmp_path: Path) -> None:
    clock, driver, path = FakeClock(), HalfMovedBack(), tmp_path / "undo.jsonl"
    undoer = _undoer(path, clock, driver)
    undoer.journal.begin(_record(clock))
    clock.advance(10)  # TTL passed

    first = undoer.expire()
    assert "revert failed (attempt 1" in first[0], first
    assert [r.id for r in undoer.journal.active()] == ["q1"]  # not "moved 0 task(s) back"
    assert [(r.id, why.attempts) for r, why in undoer.stuck()] == [("q1", 1)]
    assert undoer.stats["revert-failed"] == 1

    clock.advance(RETRY_FIRST_S - 1)
    assert undoer.expire() == []  # backing off
    clock.advance(1)
    second = undoer.expire()
    assert "revert failed (attempt 2" in second[0] and "retry in 10 s" in second[0], second
    assert undoer.stats["revert-retried"] == 1
    undoer.journal.close()

    # The agent is replaced: the new one knows how often it failed and keeps to the delay.
    undoer = _undoer(path, clock, driver)
    assert undoer.journal.failures()["q1"].attempts == 2
    assert undoer.reconcile() == [] and undoer.expire() == []  # 10 s from the last failure
    clock.advance(2 * RETRY_FIRST_S)
    assert "revert failed (attempt 3" in undoer.expire()[0]
    driver.fixed = True
    assert undoer.expire() == []  # 20 s now
    clock.advance(4 * RETRY_FIRST_S)
    done = undoer.expire()
    assert "moved 1 task(s) back" in done[0] and "removed the quarantine" in done[0], done
    assert driver.where == HOMES and driver.removed == [Q]
    assert undoer.journal.active() == [] and undoer.stuck() == []
    undoer.journal.close()


def test_an_explicit_request_does_not_wait_for_the_backoff(tmp_path: Path) -> None:
    clock, driver = FakeClock(), HalfMovedBack()
    undoer = _undoer(tmp_path / "undo.jsonl", clock, driver)
    undoer.journal.begin(_record(clock))
    assert "revert failed" in undoer.revert_all("agent shutdown")[0]
    driver.fixed = True
    assert "moved 1 task(s) back" in undoer.revert_all("agent shutdown")[0]
    assert undoer.journal.active() == []
    undoer.journal.close()


def test_the_backoff_doubles_up_to_a_cap() -> None:
    assert [retry_delay(n) for n in (1, 2, 3)] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S, 20.0]
    assert retry_delay(50) == RETRY_MAX_S
