"""The audit chain: every line names the hash of the one before, across restarts and rotations;
`remedy audit --verify` finds an edited, deleted, reordered or truncated line."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_audit import _decision

from remedy.cli import main
from remedy.service.audit import GENESIS, TORN_LINE, AuditLog, line_hash, rotated_paths
from remedy.tools.auditquery import EXIT_BROKEN, AuditFilter, iter_entries, parse_since, verify

# The audit tests' decision, at a round time, so chained lines are easy to tell apart.
BASE = replace(_decision("would-act"), time=1_800_000_000.0, message="would quarantine pid 42")


def _write(path: Path, n: int, **kwargs: Any) -> None:
    log = AuditLog(path, **kwargs)
    for i in range(n):
        log.record(replace(BASE, pid=100 + i, time=BASE.time + i))
    log.close()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _chained(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for f in rotated_paths(path) for raw in _lines(f)]


def test_each_line_names_the_hash_of_the_previous(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 3)
    raw = _lines(path)
    entries = [json.loads(line) for line in raw]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert entries[1]["prev"] == line_hash(raw[0])
    assert entries[2]["prev"] == line_hash(raw[1])
    assert verify(path) == (3, None)


def test_a_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 2)
    _write(path, 2)
    entries = _chained(path)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert entries[2]["prev"] == line_hash(_lines(path)[1])
    assert verify(path) == (4, None)


def test_rotation_keeps_the_chain_and_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    limit = 2 * (len(_lines_of_one(tmp_path)) + 1) + 8  # two lines, some slack for digits
    _write(path, 10, max_bytes=limit, keep=3)
    files = rotated_paths(path)
    assert [f.name for f in files] == [
        "audit.jsonl.3",
        "audit.jsonl.2",
        "audit.jsonl.1",
        "audit.jsonl",
    ]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.stat().st_size <= limit
    # The oldest lines were rotated away: the chain starts at the oldest file present.
    seqs = [e["seq"] for e in _chained(path)]
    assert seqs == list(range(3, 11))
    assert verify(path) == (8, None)
    # A restart after rotation continues from the live file.
    _write(path, 1, max_bytes=limit, keep=3)
    assert _chained(path)[-1]["seq"] == 11
    assert verify(path)[1] is None


def test_a_restart_right_after_a_rotation_continues_from_the_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 2)
    path.rename(tmp_path / "audit.jsonl.1")  # the crash window: renamed, no new line yet
    _write(path, 1)
    assert json.loads(_lines(path)[0])["seq"] == 3
    assert verify(path) == (3, None)
    # ... and so does one whose first line in the new file was torn.
    (tmp_path / "audit.jsonl.1").rename(tmp_path / "audit.jsonl.2")
    path.rename(tmp_path / "audit.jsonl.1")
    path.write_bytes(b'{"tor')
    _write(path, 1)
    assert [json.loads(raw)["seq"] for raw in _lines(path)[1:]] == [4, 5]
    assert verify(path) == (5, None)


def _lines_of_one(tmp_path: Path) -> bytes:
    probe = tmp_path / "probe.jsonl"
    _write(probe, 1)
    return _lines(probe)[0]


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write(path, 5)
    return path


def test_verify_finds_an_edited_line(chain: Path) -> None:
    raw = _lines(chain)
    raw[2] = raw[2].replace(b"would-act", b"acted")
    chain.write_bytes(b"\n".join(raw) + b"\n")
    _, broken = verify(chain)
    assert broken is not None
    assert (broken.line, broken.expected, broken.found) == (
        4,
        line_hash(raw[2]),
        json.loads(raw[3])["prev"],
    )


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (lambda raw: raw[:2] + raw[3:], 3),  # deleted
        (lambda raw: [raw[0], raw[2], raw[1], *raw[3:]], 2),  # reordered
        (lambda raw: [*raw[:4], b"{not json"], 5),  # garbage
    ],
)
def test_verify_finds_deleted_reordered_and_garbled_lines(
    chain: Path, change: Any, line: int
) -> None:
    chain.write_bytes(b"\n".join(change(_lines(chain))) + b"\n")
    _, broken = verify(chain)
    assert broken is not None
    assert broken.line == line


def test_verify_finds_a_truncated_file(chain: Path) -> None:
    data = chain.read_bytes()
    chain.write_bytes(data[: len(data) - 20])
    _, broken = verify(chain)
    assert broken is not None
    assert broken.line == 5
    assert "no newline" in broken.reason


def test_verify_finds_a_rotated_file_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    one_line = len(_lines_of_one(tmp_path)) + 1
    _write(path, 6, max_bytes=one_line * 2)
    rotated = tmp_path / "audit.jsonl.1"
    rotated.write_bytes(_lines(rotated)[0] + b"\n")  # its last line removed
    _, broken = verify(path)
    assert broken is not None
    assert (broken.file, broken.line) == (path, 1)


def test_verify_finds_a_first_line_that_does_not_start_the_chain(chain: Path) -> None:
    raw = _lines(chain)
    entry = json.loads(raw[0])
    entry["prev"] = "f" * 64
    raw[0] = json.dumps(entry, sort_keys=True).encode()
    chain.write_bytes(b"\n".join(raw) + b"\n")
    _, broken = verify(chain)
    assert broken is not None
    assert broken.line == 1


def test_a_torn_line_is_closed_off_recorded_and_stepped_over(chain: Path) -> None:
    good = _lines(chain)
    with chain.open("ab") as f:
        f.write(b'{"policy": "fork-bomb", "outc')  # the crash
    _write(chain, 1)
    raw = _lines(chain)
    assert raw[5] == b'{"policy": "fork-bomb", "outc'
    event = json.loads(raw[6])
    assert event["event"] == TORN_LINE
    assert event["torn_sha256"] == line_hash(raw[5])
    assert event["prev"] == line_hash(good[4])
    assert event["seq"] == 6
    assert json.loads(raw[7])["seq"] == 7
    assert verify(chain) == (7, None)
    # The fragment is skipped only with its torn-line entry right after it.
    del raw[6]
    chain.write_bytes(b"\n".join(raw) + b"\n")
    assert verify(chain)[1] is not None


def test_queries_filter_by_since_policy_outcome_and_pid(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record(BASE)
    log.record(replace(BASE, time=BASE.time + 3600, policy="leak", outcome="acted", pid=7))
    log.record(replace(BASE, time=BASE.time + 7200, outcome="skipped"))
    log.close()

    def pids(**kwargs: Any) -> list[int]:
        wanted = AuditFilter(**kwargs)
        return [e["pid"] for e in iter_entries(path) if wanted.matches(e)]

    assert pids() == [42, 7, 42]
    assert pids(since=BASE.time + 1) == [7, 42]
    assert pids(policy="leak") == [7]
    assert pids(outcome="skipped") == [42]
    assert pids(pid=7) == [7]
    assert pids(policy="fork-bomb", outcome="would-act") == [42]


def test_since_takes_an_iso_time_or_a_duration() -> None:
    assert parse_since("2027-01-15T08:00:00+00:00") == 1_800_000_000.0
    assert parse_since("2027-01-15T08:00:00") == 1_800_000_000.0  # naive means UTC
    assert parse_since("1h", now=10_000.0) == 6_400.0
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


def test_cli_exit_codes_and_output(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(chain), "--verify"]) == 0
    assert "ok: chain intact, 5 line(s)" in capsys.readouterr().out

    assert main(["audit", str(chain), "--pid", "101"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["2027-01-15T08:00:01.000+00:00  fork-bomb  would-act  would quarantine pid 42"]

    assert main(["audit", str(chain), "--policy", "fork-bomb", "--format", "json"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [
        1,
        2,
        3,
        4,
        5,
    ]

    raw = _lines(chain)
    chain.write_bytes(b"\n".join([raw[0], raw[2], raw[1], *raw[3:]]) + b"\n")
    assert main(["audit", str(chain), "--verify"]) == EXIT_BROKEN
    out = capsys.readouterr().out
    assert f"{chain}:2:" in out
    assert "expected prev" in out and "found    prev" in out

    assert main(["audit", str(chain), "--since", "yesterday"]) == 2
    assert main(["audit", str(chain.with_name("missing.jsonl"))]) == 2
