"""A wall-clock step of an hour, forwards then backwards, against the real agent: no TTL is cut
short or extended (issue 11). TTLs run on CLOCK_BOOTTIME within a boot; the wall clock is what
an operator, NTP or a VM resume can step at any time.

The test steps this host's CLOCK_REALTIME by +1 h and then by -2 h, and always puts it back by
the exact net amount in a finally (monotonic and boot-time clocks, which every timeout and
timer here uses, are not affected by a step). The offender is a bounded fork storm in the
test's pids-limited cgroup.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_agent_fault_injection import (
    QUARANTINE_3S,
    TTL_S,
    _cgroup_of,
    _forker,
    _start_agent,
    _verify,
    _wait_for,
    _write_config,
)

from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

HOUR = 3600.0
LATE_S = 1.5  # the agent ticks about every 0.1-0.5 s: on time means within this of the TTL


def _step(seconds: float) -> None:
    """Step the wall clock by ``seconds`` (root: clock_settime(CLOCK_REALTIME))."""
    time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) + seconds)


def _reverted_at(journal: Path, record_id: str) -> bool:
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("op") == "revert" and entry.get("id") == record_id:
            return True
    return False


def test_a_wall_clock_step_neither_cuts_short_nor_extends_a_ttl(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    _write_config(tmp_path, test_cgroup, QUARANTINE_3S)
    journal = tmp_path / "undo.jsonl"
    qroot = f"{test_cgroup.rel}/quarantine"
    agent = _start_agent(tmp_path, test_cgroup, repo_root, journal=journal)
    storm = _forker(test_cgroup, forks=100_000, seconds=30)
    stepped = 0.0
    try:
        _wait_for(
            "the quarantine", lambda: _cgroup_of(storm.pid).startswith(f"{qroot}/"), 15, agent
        )
        applied = json.loads(journal.read_text().splitlines()[0])["record"]
        due = applied["boottime"] + TTL_S
        # +1 h: a wall-clock TTL would be over at once.
        _step(HOUR)
        stepped += HOUR
        time.sleep(1.0)
        assert time.clock_gettime(time.CLOCK_BOOTTIME) < due
        cut_short = _reverted_at(journal, applied["id"])
        # -2 h: now an hour behind; a wall-clock TTL would run for another hour.
        _step(-2 * HOUR)
        stepped -= 2 * HOUR
        deadline = due + LATE_S + 5
        while (
            not _reverted_at(journal, applied["id"])
            and time.clock_gettime(time.CLOCK_BOOTTIME) < deadline
        ):
            time.sleep(0.05)
        reverted = time.clock_gettime(time.CLOCK_BOOTTIME)
        was_reverted = _reverted_at(journal, applied["id"])
    finally:
        _step(-stepped)  # the host's clock exactly as it was (plus the time that passed)
        agent.stop()
        if storm.poll() is None:
            storm.kill()
        storm.wait(10)
    print(agent.output())
    assert not cut_short, "a +1 h wall-clock step cut the 3 s TTL short"
    assert was_reverted, "a -1 h wall-clock step extended the TTL: not reverted"
    assert reverted <= due + LATE_S, f"reverted {reverted - due:.2f} s past its TTL"
    verified = _verify(tmp_path, repo_root)
    assert verified.returncode == 0, verified.stdout + verified.stderr
