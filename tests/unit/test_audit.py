"""The audit log: one JSON line per decision, appended, private."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest

from remedy.engine.decisions import Decision
from remedy.service.audit import AuditLog, ConsoleSink, FanOut


def _decision(outcome: str) -> Decision:
    return Decision(
        time=1_800_000_000.25,
        policy="fork-bomb",
        signal="fork_rate",
        pid=42,
        start_ticks=7,
        comm="forker",
        ppid=1,
        exe="/usr/bin/forker",
        cgroup="/sys/fs/cgroup/pids/a",
        count=200,
        window_s=1.0,
        action="quarantine",
        step=0,
        dry_run=True,
        outcome=outcome,
        reason="dry-run",
        message="would quarantine pid 42 (forker) in /sys/fs/cgroup/pids/a: ...",
        state="cooldown",
    )


def test_lines_are_appended_json_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for outcome in ("would-act", "skipped"):
        log = AuditLog(path)  # reopened: a restart appends, never truncates
        log.record(_decision(outcome))
        log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["would-act", "skipped"]
    for key in ("time", "ts", "policy", "pid", "comm", "cgroup", "action", "dry_run", "reason"):
        assert key in lines[0]
    assert lines[0]["ts"] == "2027-01-15T08:00:00.250+00:00"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_console_and_fan_out() -> None:
    out = io.StringIO()
    FanOut([ConsoleSink(out), ConsoleSink(out)]).record(_decision("would-act"))
    assert out.getvalue().count("[fork-bomb] dry-run: would quarantine pid 42") == 2


def test_lines_carry_the_chain_and_bad_rotation_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20, keep=2)
    log.record(_decision("would-act"))
    log.close()
    line = json.loads(path.read_text())
    assert (line["seq"], line["prev"]) == (1, "0" * 64)
    with pytest.raises(ValueError, match="max_bytes"):
        AuditLog(tmp_path / "other.jsonl", max_bytes=0)
    with pytest.raises(ValueError, match="keep"):
        AuditLog(tmp_path / "other.jsonl", keep=0)
