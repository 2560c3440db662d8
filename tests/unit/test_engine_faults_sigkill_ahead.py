"""A terminate's SIGKILL after its grace is an irreversible step of its own: written ahead,
and held (SIGTERM sent, no SIGKILL) while the audit cannot take its intent."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from test_audit_faults import FlakyWrite
from test_terminate_timer import GRACE_S, FakeProcess, ListSink, _record, _rig

from remedy.service.audit import AuditLog, FanOut
from remedy.tools.auditquery import check


def test_the_sigkill_is_written_ahead_and_held_while_the_audit_is_down(tmp_path: Path) -> None:
    stubborn = FakeProcess(ignores_term=True)
    r = _rig(tmp_path, {42: stubborn})
    path, write, seen = tmp_path / "audit.jsonl", FlakyWrite(), ListSink()
    r.engine._sink = FanOut([seen, AuditLog(path, write=write)])
    r.engine.on_record(_record(42))
    write.full = True  # the disk fills during the grace
    r.clock.advance(GRACE_S)
    r.engine.tick()
    assert signal.SIGKILL not in stubborn.signals  # not unrecorded
    write.full = False
    r.clock.advance(0.2)
    r.engine.tick()
    assert stubborn.signals[-1] == signal.SIGKILL
    lines = [json.loads(raw) for raw in path.read_bytes().splitlines()]
    decided = [(e["outcome"], e["step"]) for e in lines if "event" not in e]
    assert decided == [("intent", 0), ("acted", 0), ("intent", -1), ("acted", -1)]
    assert lines[-1]["intent"] == lines[-2]["seq"]
    report = check(path)
    assert (report.broken, report.unfinished) == (None, ())
    r.engine.close()
    assert stubborn.open_pins == 0
