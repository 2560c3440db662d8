"""Cgroup actions against a tmp tree shaped like a cgroup2 mount: files and formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV2Driver
from remedy.actions.params import (
    ActionParams,
    FreezeParams,
    IoWeightParams,
    LimitMemoryParams,
    LimitPidsParams,
    ThrottleCpuParams,
)
from remedy.actions.throttle import (
    CgroupAction,
    Freeze,
    IoWeight,
    LimitMemory,
    LimitPids,
    ThrottleCpu,
)
from remedy.engine.offender import Subject
from remedy.errors import CgroupError
from remedy.proc import ProcFS

Case = tuple[CgroupAction, ActionParams, str, str, str]  # action, params, file, before, want
CASES: list[Case] = [
    (ThrottleCpu(), ThrottleCpuParams(cpu=0.5), "cpu.max", "max 100000", "50000 100000"),
    (
        LimitMemory(),
        LimitMemoryParams.model_validate({"high": "2Gi"}),
        "memory.high",
        "max",
        str(2 << 30),
    ),
    (LimitPids(), LimitPidsParams(max=9), "pids.max", "max", "9"),
    (Freeze(), FreezeParams(), "cgroup.freeze", "0", "1"),
    (IoWeight(), IoWeightParams(weight=500), "io.weight", "default 100", "default 500"),
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    app = root / "app"
    app.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    (app / "cgroup.procs").write_text("")
    for _action, _params, name, before, _want in CASES:
        (app / name).write_text(before + "\n")
    return root


def _ctx(root: Path) -> ActionContext:
    procfs = ProcFS(root / "proc")
    return ActionContext(CgroupV2Driver(root, procfs), procfs, scope="cgroup")


def _subject(root: Path) -> Subject:
    inode = (root / "app").stat().st_ino  # as identification reads it
    return Subject(4242, 1, "x", 1, None, 0, False, "/app", "/app", cgroup_inode=inode)


@pytest.mark.parametrize("case", CASES)
def test_in_place_writes_and_restores(root: Path, case: Case) -> None:
    action, params, name, before, want = case
    ctx = ActionContext(
        CgroupV2Driver(root, ProcFS(root / "proc")), ProcFS(root / "proc"), scope="cgroup"
    )
    record = action.undo(params, _subject(root), ctx, policy="p", ttl_s=5, now_wall=10)
    assert record.previous[action.knob] == before
    action.run(params, _subject(root), ctx)
    assert (root / "app" / name).read_text() == want
    action.revert(record, ctx)
    assert (root / "app" / name).read_text() == before


def test_io_weight_without_io_controller(root: Path) -> None:
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    ctx = ActionContext(
        CgroupV2Driver(root, ProcFS(root / "proc")), ProcFS(root / "proc"), scope="cgroup"
    )
    with pytest.raises(CgroupError, match="io controller not available"):
        IoWeight().run(IoWeightParams(weight=5), _subject(root), ctx)
