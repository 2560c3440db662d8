"""The systemd unit gives the engine room for its pidfds (issue 11, item 4): from about 1,000
offenders, the default soft limit of 1,024 made pidfd_open fail with EMFILE."""

from __future__ import annotations

from pathlib import Path

from remedy.engine.engine import DEFAULT_MAX_OFFENDERS, handle_budget

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "remedy.service"


def _limit_nofile() -> tuple[int, int]:
    values = [
        line.partition("=")[2].strip()
        for line in UNIT.read_text().splitlines()
        if line.strip().startswith("LimitNOFILE=")
    ]
    assert len(values) == 1, f"{UNIT}: expected one LimitNOFILE=, got {values}"
    soft, _, hard = values[0].partition(":")
    return int(soft), int(hard or soft)


def test_the_unit_lets_the_engine_hold_a_pidfd_for_every_offender_it_tracks() -> None:
    soft, hard = _limit_nofile()
    assert soft <= hard
    # The whole default cap fits in the engine's share of the limit, with the rest to spare.
    assert handle_budget(DEFAULT_MAX_OFFENDERS, soft) == DEFAULT_MAX_OFFENDERS
    assert soft - DEFAULT_MAX_OFFENDERS >= 4 * 1_024
