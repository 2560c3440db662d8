"""The undo journal: durable before applied, replayable after a crash, nothing reverted twice."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remedy.actions.journal import RETRY_FIRST_S, Journal, JournalError, reconcile
from remedy.actions.undo import UndoRecord
from remedy.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "undo.jsonl"


@pytest.fixture
def journal(path: Path, clock: FakeClock) -> Iterator[Journal]:
    j = Journal(path, clock)
    yield j
    j.close()


def _record(
    rid: str,
    clock: FakeClock,
    *,
    ttl: float = 60.0,
    policy: str = "cpu-hog",
    pid: int = 42,
    start_ticks: int = 7,
) -> UndoRecord:
    now = clock.wall()
    return UndoRecord(
        id=rid,
        action="throttle_cpu",
        policy=policy,
        pid=pid,
        start_ticks=start_ticks,
        cgroup="/user.slice/app",
        created=now,
        expires=now + ttl,
        previous={"cpu_cores": "max"},
        original_cgroup="/user.slice",
        pids=(pid, pid + 1),
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ids(records: list[UndoRecord]) -> list[str]:
    return [r.id for r in records]


def test_created_private_in_a_private_directory(journal: Journal, path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert journal.active() == []


def test_an_existing_file_is_made_private(path: Path, clock: FakeClock) -> None:
    path.parent.mkdir()
    path.write_text("")
    path.chmod(0o644)
    Journal(path, clock).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_begin_is_on_disk_and_fsynced_when_it_returns(
    journal: Journal, path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    record = _record("a", clock)
    journal.begin(record)
    (line,) = _lines(path)
    assert line == {"op": "apply", "record": record.to_json(), "at": clock.wall()}
    assert synced == [path.stat().st_size]  # the whole line was written before the fsync
    assert UndoRecord.from_json(line["record"]) == record


def test_revert_and_abandon_lines(journal: Journal, path: Path, clock: FakeClock) -> None:
    journal.begin(_record("a", clock))
    journal.begin(_record("b", clock))
    clock.advance(5)
    assert journal.reverted("a", "offender recovered", detail="cpu.max restored to max")
    assert journal.abandon("b", "cgroup write failed")
    assert _lines(path)[2:] == [
        {
            "op": "revert",
            "id": "a",
            "reason": "offender recovered",
            "outcome": "reverted",
            "detail": "cpu.max restored to max",
            "at": clock.wall(),
        },
        {"op": "abandon", "id": "b", "reason": "cgroup write failed", "at": clock.wall()},
    ]
    assert journal.active() == []


def test_nothing_is_closed_twice(journal: Journal, path: Path, clock: FakeClock) -> None:
    journal.begin(_record("a", clock))
    journal.begin(_record("b", clock))
    assert journal.reverted("a", "ttl expired")
    size = path.stat().st_size
    assert not journal.reverted("a", "ttl expired")
    assert not journal.abandon("a", "late failure")
    assert not journal.reverted("nope", "ttl expired")
    assert not journal.failed("a", "ttl expired", "boom")
    assert path.stat().st_size == size  # a refused close writes nothing
    assert journal.abandon("b", "apply failed")
    assert not journal.reverted("b", "shutdown")
    assert journal.closed_entries == 2


def test_an_id_is_never_reused(journal: Journal, clock: FakeClock) -> None:
    journal.begin(_record("a", clock))
    with pytest.raises(ValueError, match="already"):
        journal.begin(_record("a", clock))
    journal.reverted("a", "ttl expired")
    with pytest.raises(ValueError, match="already"):
        journal.begin(_record("a", clock))  # or a reverted record could come back to life


def test_active_keeps_apply_order(journal: Journal, path: Path, clock: FakeClock) -> None:
    for rid in "dcbae":
        journal.begin(_record(rid, clock))
        clock.advance(1)
    journal.reverted("b", "ttl expired")
    journal.abandon("d", "apply failed")
    assert _ids(journal.active()) == ["c", "a", "e"]
    journal.close()
    again = Journal(path, clock)
    assert _ids(again.active()) == ["c", "a", "e"]
    again.close()


def test_replays_are_idempotent(path: Path, clock: FakeClock) -> None:
    first = Journal(path, clock)
    for rid in "abc":
        first.begin(_record(rid, clock))
    first.reverted("b", "recovered")
    expected = first.active()
    assert first.closed_entries == 1
    first.close()
    j = Journal(path, clock)  # compacts on start: the closed record's lines go
    assert j.active() == expected
    assert j.closed_entries == 0
    j.close()
    content = path.read_bytes()
    assert len(content.splitlines()) == 2
    for _ in range(2):
        j = Journal(path, clock)
        assert j.active() == expected
        j.close()
    assert path.read_bytes() == content  # a compact journal: reading changes nothing


def test_a_second_owner_is_refused(journal: Journal, path: Path, clock: FakeClock) -> None:
    with pytest.raises(JournalError, match="in use"):
        Journal(path, clock, lock_wait_s=0.2)


def test_writing_after_close_is_an_error(journal: Journal, clock: FakeClock) -> None:
    journal.close()
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.begin(_record("a", clock))


def test_a_torn_last_line_is_dropped_and_earlier_records_kept(
    path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(path, clock)
    j.begin(_record("a", clock))
    j.begin(_record("b", clock))
    j.reverted("a", "recovered")
    j.close()
    os.truncate(path, path.stat().st_size - 9)  # the crash hit mid-write of the revert line
    with caplog.at_level(logging.WARNING):
        j = Journal(path, clock)
    assert "torn last line" in caplog.text
    assert _ids(j.active()) == ["a", "b"]  # the revert never became durable: still to undo
    j.begin(_record("c", clock))  # appends after the cut, not onto the fragment
    j.close()
    assert [line["op"] for line in _lines(path)] == ["apply", "apply", "apply"]
    j = Journal(path, clock)
    assert _ids(j.active()) == ["a", "b", "c"]
    j.close()


def test_a_torn_apply_line_means_the_change_was_never_made(path: Path, clock: FakeClock) -> None:
    j = Journal(path, clock)
    j.begin(_record("a", clock))
    j.close()
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b'{"op": "apply", "record": {"id": "b", "act')
    j = Journal(path, clock)
    assert _ids(j.active()) == ["a"]
    assert path.stat().st_size == size
    j.close()


def test_a_whole_entry_missing_only_its_newline_is_kept(path: Path, clock: FakeClock) -> None:
    j = Journal(path, clock)
    j.begin(_record("a", clock))
    j.begin(_record("b", clock))
    j.close()
    os.truncate(path, path.stat().st_size - 1)
    j = Journal(path, clock)
    assert _ids(j.active()) == ["a", "b"]
    j.reverted("a", "recovered")
    j.close()
    assert [line["op"] for line in _lines(path)] == ["apply", "apply", "revert"]


def test_a_corrupt_middle_line_is_skipped_with_a_warning(
    path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(path, clock)
    j.begin(_record("a", clock))
    j.close()
    with path.open("a") as f:
        f.write("garbage\n")
        f.write('{"op": "apply", "record": {"id": "x"}}\n')
        f.write('{"op": "frobnicate"}\n')
    j = Journal(path, clock)
    j.begin(_record("b", clock))
    j.close()
    with caplog.at_level(logging.WARNING):
        j = Journal(path, clock)
    assert _ids(j.active()) == ["a", "b"]
    assert ":2: ignoring a line that is not a JSON object" in caplog.text
    assert ":3: ignoring a malformed 'apply' entry" in caplog.text
    assert ":4: ignoring unknown op 'frobnicate'" in caplog.text
    j.close()


def test_a_failed_write_leaves_no_fragment_and_no_record(
    journal: Journal, path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.begin(_record("a", clock))
    size = path.stat().st_size

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(JournalError, match="cannot write"):
        journal.begin(_record("b", clock))
    assert path.stat().st_size == size
    assert _ids(journal.active()) == ["a"]
    monkeypatch.undo()
    journal.begin(_record("b", clock))  # the id was not consumed
    assert _ids(journal.active()) == ["a", "b"]


def test_due_follows_the_clock(journal: Journal, clock: FakeClock) -> None:
    journal.begin(_record("short", clock, ttl=10))
    journal.begin(_record("long", clock, ttl=100))
    assert journal.due() == []
    clock.advance(10)
    assert _ids(journal.due()) == ["short"]  # expires <= now
    clock.advance(90)
    assert _ids(journal.due()) == ["short", "long"]
    journal.reverted("short", "ttl expired")
    assert _ids(journal.due()) == ["long"]


def test_lookup_by_offender_and_policy(journal: Journal, clock: FakeClock) -> None:
    journal.begin(_record("a", clock, pid=42, start_ticks=7, policy="cpu-hog"))
    journal.begin(_record("b", clock, pid=42, start_ticks=9, policy="cpu-hog"))  # pid reused
    journal.begin(_record("c", clock, pid=43, start_ticks=7, policy="mem-hog"))
    journal.begin(_record("d", clock, pid=42, start_ticks=7, policy="mem-hog"))
    assert _ids(journal.for_offender(42, 7)) == ["a", "d"]
    assert _ids(journal.for_policy("cpu-hog")) == ["a", "b"]
    journal.reverted("a", "offender recovered")
    assert _ids(journal.for_offender(42, 7)) == ["d"]
    assert journal.for_offender(44, 7) == []
    assert journal.for_policy("gone") == []


def test_compact_keeps_only_active_apply_lines(path: Path, clock: FakeClock) -> None:
    j = Journal(path, clock)
    for rid in "abcd":
        j.begin(_record(rid, clock))
        clock.advance(1)
    applied = {line["record"]["id"]: line for line in _lines(path)}
    j.reverted("a", "recovered")
    j.abandon("c", "apply failed")
    j.compact()
    assert _lines(path) == [applied["b"], applied["d"]]  # original "at" kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_name(path.name + ".tmp").exists()
    assert j.closed_entries == 0
    assert not j.reverted("a", "again")  # closed before compaction is still closed
    j.begin(_record("e", clock))  # appends go to the new file
    j.reverted("b", "recovered")
    j.close()
    j = Journal(path, clock)
    assert _ids(j.active()) == ["d", "e"]
    j.close()


def test_a_crash_before_the_rename_leaves_the_old_journal(
    path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(path, clock)
    for rid in "abc":
        j.begin(_record(rid, clock))
    j.reverted("b", "recovered")
    before = path.read_bytes()
    tmp = path.with_name(path.name + ".tmp")

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(JournalError, match="cannot compact"):
        j.compact()
    monkeypatch.undo()
    assert path.read_bytes() == before
    j.reverted("c", "recovered")  # still writing to the real journal
    j.close()
    tmp.write_text('{"op": "apply", "record": {"id": "half')  # a hard crash leaves the tmp file
    j = Journal(path, clock)
    assert _ids(j.active()) == ["a"]
    assert not tmp.exists()
    j.close()


def test_reconcile_reverts_expired_and_keeps_the_rest(path: Path, clock: FakeClock) -> None:
    j = Journal(path, clock)
    j.begin(_record("old", clock, ttl=10))
    j.begin(_record("fresh", clock, ttl=600))
    j.close()  # the crash
    clock.advance(60)
    j = Journal(path, clock)
    calls: list[str] = []

    def revert(record: UndoRecord) -> str:
        calls.append(record.id)
        return f"restored {record.previous}"

    done = reconcile(j, revert)
    assert [(r.id, detail) for r, detail in done] == [("old", "restored {'cpu_cores': 'max'}")]
    assert _ids(j.active()) == ["fresh"]
    assert _lines(path)[-1]["reason"] == "ttl expired after restart"
    assert reconcile(j, revert) == []
    assert calls == ["old"]  # nothing reverted twice
    j.close()


def test_reconcile_without_keep_reverts_everything(path: Path, clock: FakeClock) -> None:
    j = Journal(path, clock)
    j.begin(_record("old", clock, ttl=10))
    j.begin(_record("fresh", clock, ttl=600))
    clock.advance(60)
    done = reconcile(j, lambda r: "ok", keep_unexpired=False)
    assert [r.id for r, _ in done] == ["old", "fresh"]
    assert j.active() == []
    reasons = {line["id"]: line["reason"] for line in _lines(path) if line["op"] == "revert"}
    assert reasons == {"old": "ttl expired after restart", "fresh": "agent restart"}
    j.close()


def test_a_failed_revert_is_retried_next_start(
    path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(path, clock)
    j.begin(_record("a", clock, ttl=10))
    j.begin(_record("b", clock, ttl=10))
    clock.advance(60)

    def flaky(record: UndoRecord) -> str:
        if record.id == "a":
            raise PermissionError("cpu.max: Permission denied")
        return "ok"

    with caplog.at_level(logging.WARNING):
        done = reconcile(j, flaky)
    assert [(r.id, detail) for r, detail in done] == [
        ("a", "revert-failed: PermissionError: cpu.max: Permission denied"),
        ("b", "ok"),
    ]
    assert "undo a (throttle_cpu on pid 42" in caplog.text
    assert _ids(j.active()) == ["a"]  # not marked reverted
    failed = [line for line in _lines(path) if line["op"] == "revert-failed"]
    assert failed[0]["error"] == "PermissionError: cpu.max: Permission denied"
    j.close()
    j = Journal(path, clock)  # next start, at once: still backing off, nothing tried
    assert _ids(j.active()) == ["a"]
    assert reconcile(j, lambda r: "ok now") == []
    clock.advance(RETRY_FIRST_S)
    done = reconcile(j, lambda r: "ok now")
    assert [(r.id, detail) for r, detail in done] == [("a", "ok now")]
    assert j.active() == []
    j.close()


def test_failed_attempts_are_counted_across_restarts_and_compaction(
    path: Path, clock: FakeClock
) -> None:
    j = Journal(path, clock)
    j.begin(_record("a", clock))
    j.begin(_record("b", clock))
    assert j.failed("a", "ttl expired", "CgroupError: still in the quarantine")
    clock.advance(5)
    assert j.failed("a", "retry: ttl expired", "CgroupError: still in the quarantine")
    assert {i: w.attempts for i, w in j.failures().items()} == {"a": 2}
    j.close()
    j = Journal(path, clock)  # a new agent sees what the old one could not take back
    why = j.failures()["a"]
    assert (why.attempts, why.reason, why.error) == (
        2,
        "retry: ttl expired",
        "CgroupError: still in the quarantine",
    )
    j.compact()  # keeps the count, not one line per attempt
    assert [line["op"] for line in _lines(path)] == ["apply", "apply", "revert-failed"]
    j.close()
    j = Journal(path, clock)
    assert j.failures()["a"].attempts == 2
    assert j.reverted("a", "retry: ttl expired")
    assert j.failures() == {}
    j.close()
    assert Journal(path, clock).failures() == {}


def test_an_old_revert_failed_line_without_a_count_counts_one(path: Path, clock: FakeClock) -> None:
    record = _record("a", clock)
    lines = [
        {"op": "apply", "record": record.to_json(), "at": 1.0},
        {"op": "revert-failed", "id": "a", "reason": "r", "error": "e", "at": 2.0},
        {"op": "revert-failed", "id": "a", "reason": "r", "error": "e", "at": 3.0},
    ]
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    j = Journal(path, clock)
    assert j.failures()["a"].attempts == 2
    j.close()


def test_per_hierarchy_origins_round_trip_and_old_records_still_load(
    path: Path, clock: FakeClock
) -> None:
    origins = {"42": {"pids": "/system.slice/app.service", "cpu": "/", "memory": "/m"}}
    new = UndoRecord(**{**_record("n", clock).__dict__, "origins": origins})
    old = _record("o", clock).to_json()
    del old["origins"]  # written before per-hierarchy origins: only original_cgroup
    j = Journal(path, clock)
    j.begin(new)
    j.close()
    with path.open("a") as f:
        f.write(json.dumps({"op": "apply", "record": old, "at": 1.0}) + "\n")
    j = Journal(path, clock)
    loaded = {r.id: r for r in j.active()}
    assert loaded["n"].origins == origins
    assert loaded["o"].origins == {} and loaded["o"].original_cgroup == "/user.slice"
    j.close()
