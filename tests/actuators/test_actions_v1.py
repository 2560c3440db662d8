"""Cgroup actions on the real v1 hierarchies of this machine (root only).

Each test works under a uniquely named top cgroup in every hierarchy; the fixture kills the
children it spawned and removes the cgroups deepest first, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV1Driver
from remedy.actions.params import (
    ActionParams,
    FreezeParams,
    IoWeightParams,
    LimitMemoryParams,
    LimitPidsParams,
    ThawParams,
    ThrottleCpuParams,
)
from remedy.actions.process import ProcessHandle
from remedy.actions.throttle import (
    CgroupAction,
    Freeze,
    IoWeight,
    LimitMemory,
    LimitPids,
    Thaw,
    ThrottleCpu,
)
from remedy.actions.undo import UndoRecord
from remedy.engine.offender import Subject
from remedy.errors import CgroupError, ProtectedProcess
from remedy.proc import ProcessInfo, ProcFS

ROOT = Path("/sys/fs/cgroup")
HIERARCHIES = ("pids", "cpu", "memory", "freezer", "blkio")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    missing = [h for h in HIERARCHIES[:4] if not (ROOT / h / "tasks").exists()]
    return f"no v1 hierarchies {missing}" if missing else None


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable())),
]


@dataclass
class Box:
    driver: CgroupV1Driver
    top: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    handles: list[ProcessHandle] = field(default_factory=list)

    def mkdir(self, sub: str) -> str:
        rel = f"{self.top}/{sub}"
        for h in HIERARCHIES[:4]:
            (ROOT / h / rel[1:]).mkdir(parents=True, exist_ok=True)
        return rel

    def spawn_into(self, rel: str) -> Subject:
        child = subprocess.Popen(["sleep", "30"])
        self.children.append(child)
        for h in HIERARCHIES[:4]:
            (ROOT / h / rel[1:] / "cgroup.procs").write_text(str(child.pid))
        handle = ProcessHandle.bind(child.pid, ProcFS())
        self.handles.append(handle)
        info = handle.info
        return Subject(
            pid=info.pid,
            start_ticks=info.start_ticks,
            comm=info.comm,
            ppid=info.ppid,
            exe=info.exe,
            uid=info.uid,
            is_kernel_thread=False,
            cgroup=rel,
            cgroup_display=self.driver.display_path(rel),
            handle=handle,
            cgroup_inode=self.driver.inode(rel),  # as identification reads it
        )

    def ctx(self, scope: str, spare: set[int] | None = None) -> ActionContext:
        spared = spare or set()

        def spare_fn(info: ProcessInfo) -> str | None:
            return "spared by the test" if info.pid in spared else None

        return ActionContext(self.driver, ProcFS(), f"{self.top}/q", scope=scope, spare=spare_fn)


def _rmdir_deepest_first(top: Path) -> None:
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        for _ in range(50):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def box() -> Iterator[Box]:
    name = f"remedy-test-{uuid.uuid4().hex}"
    b = Box(CgroupV1Driver(ROOT, ProcFS()), f"/{name}")
    try:
        yield b
    finally:
        for handle in b.handles:
            handle.close()
        for child in b.children:
            if child.poll() is None:
                # A frozen task dies only once thawed.
                with contextlib.suppress(OSError):
                    for p in (ROOT / "freezer" / name).rglob("freezer.state"):
                        p.write_text("THAWED")
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        for hierarchy in HIERARCHIES:
            _rmdir_deepest_first(ROOT / hierarchy / name)
        leftover = [h for h in HIERARCHIES if (ROOT / h / name).exists()]
        assert not leftover, f"test cgroup left behind in {leftover}"


def _read(hierarchy: str, rel: str, name: str) -> str:
    return (ROOT / hierarchy / rel[1:] / name).read_text().strip()


def _undo(
    action: CgroupAction, params: ActionParams, subject: Subject, ctx: ActionContext
) -> UndoRecord:
    return action.undo(params, subject, ctx, policy="p", ttl_s=60.0, now_wall=1000.0)


Case = tuple[CgroupAction, ActionParams, str, str, str]  # action, params, hierarchy, file, want

CASES: list[Case] = [
    (ThrottleCpu(), ThrottleCpuParams(cpu=0.5), "cpu", "cpu.cfs_quota_us", "50000"),
    (LimitPids(), LimitPidsParams(max=7), "pids", "pids.max", "7"),
    (
        LimitMemory(),
        LimitMemoryParams.model_validate({"high": "64Mi"}),
        "memory",
        "memory.soft_limit_in_bytes",
        str(64 << 20),
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_in_place_applies_and_reverts(box: Box, case: Case) -> None:
    action, params, hierarchy, file, want = case
    rel = box.mkdir("app")
    subject = box.spawn_into(rel)
    ctx = box.ctx("cgroup")
    before = _read(hierarchy, rel, file)
    record = _undo(action, params, subject, ctx)
    assert record.cgroup == rel and record.original_cgroup is None
    assert record.expires == 1060.0 and len(record.id) == 32
    action.run(params, subject, ctx)
    assert _read(hierarchy, rel, file) == want
    action.revert(record, ctx)
    assert _read(hierarchy, rel, file) == before
    action.revert(record, ctx)  # twice is harmless
    assert _read(hierarchy, rel, file) == before


@pytest.mark.parametrize("case", CASES)
def test_process_scope_moves_into_quarantine_and_back(box: Box, case: Case) -> None:
    action, params, hierarchy, file, want = case
    rel = box.mkdir("app")
    subject = box.spawn_into(rel)
    bystander = box.spawn_into(rel)
    ctx = box.ctx("process")
    shared_before = _read(hierarchy, rel, file)
    record = _undo(action, params, subject, ctx)
    q = ctx.quarantine_of(subject)
    assert (record.cgroup, record.original_cgroup, record.previous) == (q, rel, {})
    action.run(params, subject, ctx)
    assert _read(hierarchy, q, file) == want
    assert box.driver.members(q) == [subject.pid]
    assert ProcFS().cgroups(subject.pid)[hierarchy] == q
    assert _read(hierarchy, rel, file) == shared_before  # the shared cgroup is untouched
    assert bystander.pid in box.driver.members(rel)
    action.revert(record, ctx)
    assert box.driver.cgroup_of(subject.pid) == rel
    assert ProcFS().cgroups(subject.pid)[hierarchy] == rel
    assert not box.driver.exists(q)
    action.revert(record, ctx)


def test_freeze_then_thaw_in_place(box: Box) -> None:
    rel = box.mkdir("app")
    subject = box.spawn_into(rel)
    ctx = box.ctx("cgroup")
    record = _undo(Freeze(), FreezeParams(), subject, ctx)
    assert record.previous["frozen"] == "THAWED"
    Freeze().run(FreezeParams(), subject, ctx)
    assert _read("freezer", rel, "freezer.state") == "FROZEN"
    thaw_record = _undo(Thaw(), ThawParams(), subject, ctx)
    Thaw().run(ThawParams(), subject, ctx)
    assert _read("freezer", rel, "freezer.state") == "THAWED"
    Thaw().revert(thaw_record, ctx)  # it was frozen before the thaw
    assert _read("freezer", rel, "freezer.state") == "FROZEN"
    Freeze().revert(record, ctx)
    assert _read("freezer", rel, "freezer.state") == "THAWED"


def test_freeze_into_quarantine_and_revert(box: Box) -> None:
    rel = box.mkdir("app")
    subject = box.spawn_into(rel)
    ctx = box.ctx("process")
    record = _undo(Freeze(), FreezeParams(), subject, ctx)
    Freeze().run(FreezeParams(), subject, ctx)
    q = ctx.quarantine_of(subject)
    assert _read("freezer", q, "freezer.state") == "FROZEN"
    assert _read("freezer", rel, "freezer.state") == "THAWED"
    Freeze().revert(record, ctx)
    assert ProcFS().cgroups(subject.pid)["freezer"] == rel
    assert not box.driver.exists(q)
    state = Path(f"/proc/{subject.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "S"


def test_refuses_a_cgroup_with_a_spared_process(box: Box) -> None:
    rel = box.mkdir("app")
    subject = box.spawn_into(rel)
    protected = box.spawn_into(rel)
    ctx = box.ctx("cgroup", spare={protected.pid})
    with pytest.raises(ProtectedProcess, match="protected"):
        _undo(LimitPids(), LimitPidsParams(max=3), subject, ctx)
    with pytest.raises(ProtectedProcess, match="protected"):
        LimitPids().run(LimitPidsParams(max=3), subject, ctx)
    assert _read("pids", rel, "pids.max") == "max"


def test_replaced_cgroup_is_refused(box: Box) -> None:
    rel = box.mkdir("app")
    subject = box.spawn_into(rel)
    ctx = box.ctx("cgroup")
    action = LimitPids()
    record = _undo(action, LimitPidsParams(max=3), subject, ctx)
    # Replace it: same name, new directory.
    other = box.mkdir("elsewhere")
    (ROOT / "pids" / other[1:] / "cgroup.procs").write_text(str(subject.pid))
    os.rmdir(ROOT / "pids" / rel[1:])
    (ROOT / "pids" / rel[1:]).mkdir()
    with pytest.raises(CgroupError, match="cgroup was replaced"):
        action.run(LimitPidsParams(max=3), subject, ctx)
    assert _read("pids", rel, "pids.max") == "max"
    assert "nothing of ours" in action.revert(record, ctx)
    assert _read("pids", rel, "pids.max") == "max"


def test_io_weight_without_the_controller_fails_cleanly(box: Box) -> None:
    if (ROOT / "blkio" / "blkio.weight").exists():
        pytest.skip("this host has blkio.weight (BFQ)")
    rel = box.mkdir("app")
    subject = box.spawn_into(rel)
    for scope in ("cgroup", "process"):
        ctx = box.ctx(scope)
        with pytest.raises(CgroupError, match="io controller not available"):
            _undo(IoWeight(), IoWeightParams(weight=50), subject, ctx)
            IoWeight().run(IoWeightParams(weight=50), subject, ctx)
    assert box.driver.cgroup_of(subject.pid) == rel
