"""The audit log under faults: a failed write leaves no fragment, a file rotated or cut from
outside is followed, the mode and the path are enforced, and an intent with no outcome is
reported by `remedy audit --verify` and by the next writer."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from test_audit_chain import BASE

from remedy.cli import main
from remedy.engine.decisions import AuditUnavailable
from remedy.service.audit import (
    AUDIT_GAP,
    REOPENED,
    TORN_LINE,
    UNFINISHED_INTENT,
    AuditLog,
    line_hash,
)
from remedy.tools.auditquery import EXIT_BROKEN, EXIT_UNFINISHED, check, verify

KILL = replace(BASE, action="kill", step=1, dry_run=False, outcome="acted", reason="crossed")
INTENT = replace(KILL, outcome="intent", reason="about to end a process")


@dataclass
class FlakyWrite:
    """os.write that, while ``full``, writes part of what it is given and then fails with
    ENOSPC, as a filesystem that runs out mid-line does."""

    full: bool = False
    partial: int = 10

    def __call__(self, fd: int, data: bytes) -> int:
        if not self.full:
            return os.write(fd, data)
        if self.partial:
            n, self.partial = os.write(fd, data[: self.partial]), 0
            return n
        self.partial = 10
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines()]


def _log(path: Path, **kwargs: Any) -> AuditLog:
    log = AuditLog(path, **kwargs)
    for i in range(3):
        log.record(replace(BASE, pid=100 + i))
    return log


def test_enospc_mid_write_leaves_no_fragment_and_the_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write = FlakyWrite()
    log = _log(path, write=write)
    before = path.read_bytes()
    write.full = True
    log.record(replace(BASE, pid=200))  # a reversible decision: lost, reported, not raised
    log.record(replace(BASE, pid=201, outcome="skipped"))
    assert path.read_bytes() == before  # the partial write was cut back off
    assert verify(path) == (3, None)
    assert not log.available
    assert (log.stats.failed_writes, log.stats.lost) == (2, 2)

    write.full = False
    log.record(replace(BASE, pid=202))
    log.close()
    assert log.available
    entries = _entries(path)
    gap = entries[3]
    assert gap["event"] == AUDIT_GAP
    assert (gap["lost"], gap["lost_outcomes"]) == (2, {"skipped": 1, "would-act": 1})
    assert [e.get("pid") for e in entries[3:]] == [None, 202]
    assert verify(path) == (5, None)


def test_a_failed_fsync_is_cut_back_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    failing = {"on": False}

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)

    log = _log(path, fsync=fsync)
    before = path.read_bytes()
    failing["on"] = True
    log.record(replace(BASE, pid=200))
    assert path.read_bytes() == before
    failing["on"] = False
    log.record(replace(BASE, pid=201))
    assert verify(path) == (5, None)


def test_an_intent_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write = FlakyWrite()
    log = _log(path, write=write)
    write.full = True
    with pytest.raises(AuditUnavailable, match="intent could not be written") as refused:
        log.record(INTENT)
    assert (refused.value.outcome, refused.value.pid) == ("audit-unavailable", 42)
    assert log.stats.refused_intents == 1
    assert verify(path) == (3, None)


def test_an_intent_and_its_outcome_are_paired(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    log.record(INTENT)
    log.record(KILL)
    log.close()
    intent, outcome = _entries(path)[3:]
    assert (intent["outcome"], outcome["outcome"]) == ("intent", "acted")
    assert outcome["intent"] == intent["seq"]
    assert check(path).unfinished == ()
    assert main(["audit", str(path), "--verify"]) == 0


def test_an_intent_without_an_outcome_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    log.record(INTENT)
    log.close()  # the agent was SIGKILLed here: the kill may or may not have happened
    report = check(path)
    assert report.broken is None
    assert [u.seq for u in report.unfinished] == [4]
    assert main(["audit", str(path), "--verify"]) == EXIT_UNFINISHED
    out = capsys.readouterr().out
    assert f"warning: {path}:4: unfinished intent (seq 4" in out
    assert "kill of pid 42 (forker), policy fork-bomb" in out
    assert "1 unfinished intent(s)" in out

    # The next agent says so at start, in the log and in the file; the intent stays unfinished.
    with caplog.at_level(logging.WARNING):
        AuditLog(path).close()
    assert "before its outcome" in caplog.text
    event = _entries(path)[-1]
    assert (event["event"], event["intent"]) == (UNFINISHED_INTENT, 4)
    (unfinished,) = check(path).unfinished
    assert "reported by the next agent (seq 5)" in unfinished.why
    assert main(["audit", str(path), "--verify"]) == EXIT_UNFINISHED

    # A broken chain is still exit 4, with the warning.
    raw = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([raw[0], raw[2], raw[1], *raw[3:]]) + b"\n")
    assert main(["audit", str(path), "--verify"]) == EXIT_BROKEN


def test_an_outcome_lost_to_a_full_disk_is_named_by_the_gap(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write = FlakyWrite()
    log = _log(path, write=write)
    log.record(INTENT)
    write.full = True
    log.record(KILL)  # the kill ran; its outcome line could not be written
    write.full = False
    log.record(replace(BASE, pid=300))
    gap = _entries(path)[4]
    assert (gap["event"], gap["intents"]) == (AUDIT_GAP, [4])
    (unfinished,) = check(path).unfinished
    assert "lost while the audit could not be written" in unfinished.why


def test_a_rename_under_the_writer_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    last = path.read_bytes().splitlines()[-1]
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate, without copytruncate
    log.record(replace(BASE, pid=300))
    log.record(replace(BASE, pid=301))
    log.close()
    entries = _entries(path)
    assert entries[0]["event"] == REOPENED
    assert entries[0]["how"] == "moved or removed"
    assert entries[0]["prev"] == line_hash(last)  # the chain spans the two files
    assert [e.get("pid") for e in entries] == [None, 300, 301]
    assert len(_entries(tmp_path / "audit.jsonl.1")) == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify(path) == (6, None)


def test_logrotate_create_with_a_wider_mode_is_followed_and_fixed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    path.rename(tmp_path / "audit.jsonl.1")
    path.touch(mode=0o644)  # `create 0644` in a logrotate stanza
    path.chmod(0o644)
    log.record(replace(BASE, pid=300))
    log.close()
    assert _entries(path)[0]["how"] == "replaced"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert log.stats.mode_fixed == 1
    assert verify(path) == (5, None)


def test_copytruncate_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    shutil.copyfile(path, tmp_path / "audit.jsonl.1")
    os.truncate(path, 0)
    log.record(replace(BASE, pid=300))
    log.close()
    entries = _entries(path)
    assert (entries[0]["event"], entries[0]["how"]) == (REOPENED, "truncated")
    assert entries[0]["seq"] == 4
    assert verify(path) == (5, None)


def test_a_file_cut_mid_line_from_outside_is_closed_off(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    data = path.read_bytes()
    os.truncate(path, len(data) - 20)
    log.record(replace(BASE, pid=300))
    log.close()
    entries = path.read_bytes().splitlines()
    assert json.loads(entries[3])["event"] == TORN_LINE  # right after the fragment
    assert json.loads(entries[4])["event"] == REOPENED
    # The cut line is gone for good: the chain breaks there, and says so.
    _, broken = verify(path)
    assert broken is not None
    assert broken.line == 4


def test_a_removed_file_is_recreated_and_rotation_still_works(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    one = len(json.dumps(BASE.to_json())) + 200
    log = _log(path, max_bytes=3 * one)
    path.rename(tmp_path / "elsewhere.jsonl")  # moved away, nothing created in its place
    for i in range(6):
        log.record(replace(BASE, pid=400 + i))  # our own rotation runs on the new file
    log.close()
    assert (tmp_path / "audit.jsonl.1").exists()
    assert verify(path)[1] is None


def test_an_existing_file_is_made_private_on_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log(path).close()
    path.chmod(0o644)
    log = AuditLog(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert log.stats.mode_fixed == 1
    log.close()


def test_a_symlink_at_the_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0\n")
    target.chmod(0o644)
    path = tmp_path / "audit.jsonl"
    path.symlink_to(target)
    with pytest.raises(AuditUnavailable, match="symlink"):
        AuditLog(path)
    assert target.read_text() == "root:x:0:0\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_symlink_planted_under_a_running_writer_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0\n")
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    path.rename(tmp_path / "audit.jsonl.1")
    path.symlink_to(target)
    log.record(replace(BASE, pid=300))  # lost, not written through the link
    with pytest.raises(AuditUnavailable):
        log.record(INTENT)
    assert target.read_text() == "root:x:0:0\n"
    assert not log.available
    path.unlink()
    log.record(replace(BASE, pid=301))
    log.close()
    assert [e.get("event") for e in _entries(path)] == [REOPENED, AUDIT_GAP, None]
    assert verify(path) == (6, None)


def test_records_after_close_do_not_reopen_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    log.close()
    path.rename(tmp_path / "audit.jsonl.1")
    log.record(replace(BASE, pid=300))  # lost, counted
    with pytest.raises(AuditUnavailable, match="closed"):
        log.record(INTENT)
    assert not path.exists()
    assert log.stats.lost == 1
