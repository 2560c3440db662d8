"""``remedy replay``: recorded traces through the real engine, byte for byte.

The goldens in tests/traces/ are what ``remedy replay`` printed for the shipped traces. When a
change to the engine or the output is intended, regenerate them (no root needed) with

    .venv/bin/python tests/traces/record_examples.py --goldens

and review the diff like code: it is the change in what enforcement would do.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from remedy.cli import main as cli_main
from remedy.tools import replay
from remedy.tools.trace import TraceError, read_trace

TRACES = Path(__file__).resolve().parents[1] / "traces"
POLICIES = TRACES / "policies"
VARIANT = TRACES / "policies-variant"
NAMES = ("storm", "burst")


def _run(trace: Path, policies: Path, against: Path | None = None, fmt: str = "text") -> str:
    out = io.StringIO()
    replay.main(trace, [policies], against=[against] if against else [], fmt=fmt, out=out)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("suffix", "policies", "against"),
    [
        ("golden", POLICIES, None),
        ("variant.golden", VARIANT, None),
        ("against.golden", POLICIES, VARIANT),
    ],
)
def test_replay_matches_the_golden(
    name: str, suffix: str, policies: Path, against: Path | None
) -> None:
    golden = (TRACES / f"{name}.{suffix}.txt").read_text()
    assert _run(TRACES / f"{name}.jsonl", policies, against) == golden, (
        "replay output changed; if intended: .venv/bin/python tests/traces/record_examples.py "
        "--goldens, and review the diff"
    )


def test_shipped_traces_are_small_and_well_formed() -> None:
    for name in NAMES:
        path = TRACES / f"{name}.jsonl"
        assert path.stat().st_size < 100_000
        header, entries = read_trace(path)
        assert header.signals["fork_rate"].threshold == 100
        assert entries and all(e.subject is not None for e in entries)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_replay_is_deterministic(fmt: str) -> None:
    for name in NAMES:
        trace = TRACES / f"{name}.jsonl"
        runs = {_run(trace, POLICIES, VARIANT, fmt) for _ in range(3)}
        assert len(runs) == 1


def test_the_storm_is_quarantined_then_killed_and_the_innocent_spared() -> None:
    out = _run(TRACES / "storm.jsonl", POLICIES, fmt="json")
    decisions = json.loads(out)["base"]["decisions"]
    assert [(d["outcome"], d["action"]) for d in decisions] == [
        ("acted", "quarantine"),
        ("acted", "kill"),
    ]
    assert all(d["dry_run"] is False for d in decisions)
    assert "--count 3000" in decisions[0]["context"]["cmdline"]


def test_against_exit_codes_and_divergence_listing(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--policies", str(POLICIES)]
    same = cli_main(["replay", str(TRACES / "storm.jsonl"), *base, "--against", str(POLICIES)])
    assert same == 0
    assert "identical:" in capsys.readouterr().out
    burst = cli_main(["replay", str(TRACES / "burst.jsonl"), *base, "--against", str(VARIANT)])
    assert burst == replay.DIVERGED == 3
    out = capsys.readouterr().out
    assert out.startswith(replay.HEADLINE + "\n")
    assert "diverged: 2 difference(s)" in out
    assert "base acted quarantine; against nothing" in out
    assert "base acted kill; against nothing" in out


def _write(path: Path, *lines: object) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _storm_lines() -> list[dict[str, object]]:
    lines = (TRACES / "storm.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_gone_subject_is_dropped_as_the_engine_drops_it(tmp_path: Path) -> None:
    header, first, second = _storm_lines()
    first["subject"] = None
    trace = _write(tmp_path / "gone.jsonl", header, first, second)
    out = json.loads(_run(trace, POLICIES, fmt="json"))["base"]
    # The first record's process had gone: nothing to act on; the second is the first action.
    assert [(d["outcome"], d["action"]) for d in out["decisions"]] == [("acted", "quarantine")]
    assert "(1 gone before identification)" in _run(trace, POLICIES)


def test_records_after_a_replayed_kill_are_dropped(tmp_path: Path) -> None:
    header, first, second = _storm_lines()
    third = {**second, "t": float(second["t"]) + 1.0}  # type: ignore[arg-type]
    trace = _write(tmp_path / "after-kill.jsonl", header, first, second, third)
    out = json.loads(_run(trace, POLICIES, fmt="json"))["base"]
    assert [d["action"] for d in out["decisions"]] == ["quarantine", "kill"]


@pytest.mark.parametrize(
    ("mutate", "line", "message"),
    [
        (lambda ls: ls.__setitem__(2, "{not json"), 3, "not JSON"),
        (lambda ls: ls[1]["record"].__setitem__("colour", 1), 2, "unknown key(s) colour"),
        (lambda ls: ls[1]["record"].pop("tgid"), 2, "missing key tgid"),
        (lambda ls: ls[2]["record"].__setitem__("count", "many"), 3, "count: expected int"),
        (lambda ls: ls[1]["record"].__setitem__("signal", "nope"), 2, "unknown signal 'nope'"),
        (lambda ls: ls[2].__setitem__("t", 0.0), 3, "before the previous line"),
        (lambda ls: ls[1]["subject"].__setitem__("parents", [[1]]), 2, "expected [pid, comm]"),
        (lambda ls: ls[0].__setitem__("remedy_trace", 2), 1, "trace format 2"),
    ],
)
def test_malformed_lines_are_rejected_naming_the_line(
    tmp_path: Path, mutate: object, line: int, message: str
) -> None:
    lines: list[object] = list(_storm_lines())
    mutate(lines)  # type: ignore[operator]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert f"{path}:{line}" in str(err.value)
    assert message in str(err.value)


def test_cli_reports_a_bad_trace_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert cli_main(["replay", str(path), "--policies", str(POLICIES)]) == 2
    assert "no header line" in capsys.readouterr().err
