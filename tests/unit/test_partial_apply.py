"""A step whose apply fails half way (here: a freeze that does not settle within 1 s,
e.g. a task in D state) must not leave its change applied with the undo record abandoned."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV2Driver
from remedy.actions.journal import Journal
from remedy.actions.params import FreezeParams
from remedy.actions.throttle import Freeze
from remedy.actions.undoer import Undoer
from remedy.clock import FakeClock
from remedy.engine.offender import Subject
from remedy.errors import CgroupError
from remedy.proc import ProcFS


def test_a_freeze_that_does_not_settle_is_not_left_frozen_and_forgotten(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    app = root / "app"
    app.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("pids cpu\n")
    (app / "cgroup.procs").write_text("")  # no member to judge
    (app / "cgroup.freeze").write_text("0\n")
    (app / "cgroup.events").write_text("populated 1\nfrozen 0\n")  # never reports frozen
    driver = CgroupV2Driver(root, ProcFS())
    clock = FakeClock()
    journal = Journal(tmp_path / "undo.jsonl", clock)
    ctx = ActionContext(driver, ProcFS(), "/remedy", scope="cgroup")
    undoer = Undoer(journal, ctx, clock, {"freeze": Freeze()})
    subject = Subject(
        pid=os.getpid(),
        start_ticks=1,
        comm="x",
        ppid=1,
        exe=None,
        uid=1000,
        is_kernel_thread=False,
        cgroup="/app",
        cgroup_display=str(app),
        cgroup_inode=os.stat(app).st_ino,
    )
    with contextlib.suppress(CgroupError):  # the freeze did not settle
        undoer.apply(Freeze(), FreezeParams(), subject, ctx, policy="p", ttl_s=60)
    frozen = (app / "cgroup.freeze").read_text().strip() == "1"
    tracked = any(r.cgroup == "/app" for r in journal.active())
    assert not frozen or tracked, "left frozen, and the undo record was abandoned"
