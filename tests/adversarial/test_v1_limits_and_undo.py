"""On the real v1 hierarchies of this machine: a move never loosens a limit, and undo puts each
hierarchy back where it was (issue 10 items 5 and 6). Root only.

Every test works under a uniquely named top cgroup in each v1 hierarchy, with a pids limit on
it; the fixture kills only the children the test spawned and removes every cgroup it made,
deepest first, even when the test fails. The memory grower is bounded (256 MiB, 10 s) and its
cgroup has a 64 MiB hard limit, so the worst it can do is be OOM-killed there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupV1Driver
from remedy.actions.journal import Journal
from remedy.actions.params import (
    ActionParams,
    LimitMemoryParams,
    QuarantineParams,
    ThrottleCpuParams,
)
from remedy.actions.process import ProcessHandle
from remedy.actions.quarantine import Quarantine
from remedy.actions.registry import ACTIONS
from remedy.actions.throttle import CgroupAction, LimitMemory, ThrottleCpu
from remedy.actions.undoer import RETRY_FIRST_S, Undoer
from remedy.clock import FakeClock
from remedy.engine.offender import Subject
from remedy.proc import ProcFS

ROOT = Path("/sys/fs/cgroup")
HIERARCHIES = ("pids", "cpu", "memory", "freezer", "blkio")
LIMIT = 64 << 20  # the grower's own hard memory limit
REPO = Path(__file__).resolve().parents[2]


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
    """A test's own top cgroup in every v1 hierarchy, and the children it spawned."""

    name: str
    driver: CgroupV1Driver = field(default_factory=lambda: CgroupV1Driver(ROOT, ProcFS()))
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    handles: list[ProcessHandle] = field(default_factory=list)

    @property
    def top(self) -> str:
        return f"/{self.name}"

    def mkdir(self, hierarchy: str, sub: str) -> str:
        rel = f"{self.top}/{sub}"
        (ROOT / hierarchy / rel[1:]).mkdir(parents=True, exist_ok=True)
        return rel

    def spawn(self, argv: list[str], where: dict[str, str], **kwargs: object) -> Subject:
        """Start ``argv`` in ``where`` (hierarchy -> path, under the pids-limited top) and pin
        it. It joins them before exec, so its every page is charged there from the start."""
        procs = " ".join(str(ROOT / h / rel[1:] / "cgroup.procs") for h, rel in where.items())
        shell = f'for f in {procs}; do echo $$ > "$f"; done; exec "$@"'
        child: subprocess.Popen[bytes] = subprocess.Popen(
            ["sh", "-c", shell, "sh", *argv],
            **kwargs,  # type: ignore[call-overload]
        )
        self.children.append(child)
        want = os.path.realpath(shutil.which(argv[0]) or argv[0])
        deadline = time.monotonic() + 5
        while os.path.realpath(f"/proc/{child.pid}/exe") != want:
            assert time.monotonic() < deadline, "the child never exec'd"
            time.sleep(0.01)
        assert _where(child.pid) == where
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
            cgroup=where["pids"],
            cgroup_display=self.driver.display_path(where["pids"]),
            handle=handle,
            cgroup_inode=self.driver.inode(where["pids"]),  # as identification reads it
        )

    def ctx(self) -> ActionContext:
        return ActionContext(self.driver, ProcFS(), f"{self.top}/q", scope="process")


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
    b = Box(f"remedy-adv-{uuid.uuid4().hex[:12]}")
    for hierarchy in HIERARCHIES[:4]:
        (ROOT / hierarchy / b.name).mkdir()
    (ROOT / "pids" / b.name / "pids.max").write_text("32")
    try:
        yield b
    finally:
        for handle in b.handles:
            handle.close()
        for child in b.children:
            if child.poll() is None:
                with contextlib.suppress(OSError):  # a frozen task dies only once thawed
                    for p in (ROOT / "freezer" / b.name).rglob("freezer.state"):
                        p.write_text("THAWED")
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        for hierarchy in HIERARCHIES:
            _rmdir_deepest_first(ROOT / hierarchy / b.name)
        leftover = [h for h in HIERARCHIES if (ROOT / h / b.name).exists()]
        assert not leftover, f"test cgroup left behind in {leftover}"


def _where(pid: int) -> dict[str, str]:
    return {h: p for h, p in ProcFS().cgroups(pid).items() if h in HIERARCHIES[:4]}


# --- 5. never loosen a limit -----------------------------------------------------------------

# Allocates and touches 8 MiB at a time: 32 MiB, then waits for a line on stdin, then up to
# 256 MiB in all, reporting each step; bounded in size and time.
GROWER = textwrap.dedent(
    """
    import sys, time
    step, chunks = 8 << 20, []
    for _ in range(4):
        chunks.append(b"\\x01" * step)
    print("grown", flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + 10
    while len(chunks) < 32 and time.monotonic() < deadline:
        chunks.append(b"\\x01" * step)
        print(len(chunks), flush=True)
        time.sleep(0.02)
    print("done", flush=True)
    sys.stdin.readline()
    """
)

MOVES: list[tuple[Quarantine | CgroupAction, ActionParams]] = [
    (Quarantine(), QuarantineParams(pids_max=16, cpu=0.5)),
    # Asks for far more than the 64 MiB the grower was held at: the move must not grant it.
    (LimitMemory(), LimitMemoryParams.model_validate({"high": "1Gi"})),
    (ThrottleCpu(), ThrottleCpuParams(cpu=0.5)),
]


def _where_was_memory_moved(q: str) -> bool:
    return (ROOT / "memory" / q[1:]).is_dir()


def _rss_anon(pid: int) -> int | None:
    """Anonymous resident memory: every page of it is charged to a memory cgroup of the
    process (where it was faulted in), so it is what the origin's limit was holding."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.split("\n"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return None


@pytest.mark.parametrize(("action", "params"), MOVES, ids=[m[0].name for m in MOVES])
def test_a_move_never_lets_a_grower_past_its_hard_limit(
    box: Box, action: Quarantine | CgroupAction, params: ActionParams
) -> None:
    app = box.mkdir("memory", "app")
    (ROOT / "memory" / app[1:] / "memory.limit_in_bytes").write_text(str(LIMIT))
    where = {h: box.top for h in HIERARCHIES[:4]} | {"memory": app}
    subject = box.spawn(
        [sys.executable, "-c", GROWER], where, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    child = box.children[-1]
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline() == b"grown\n"
    ctx = box.ctx()
    record = action.undo(params, subject, ctx, policy="p", ttl_s=60.0, now_wall=1000.0)
    detail = action.run(params, subject, ctx)
    q = ctx.quarantine_of(subject)
    # Its pages so far stay charged to app (the kernel does not move them with it).
    kept_in_app = int((ROOT / "memory" / app[1:] / "memory.usage_in_bytes").read_text())

    child.stdin.write(b"go\n")
    child.stdin.flush()
    peak, deadline = 0, time.monotonic() + 20
    while child.poll() is None and time.monotonic() < deadline:
        rss = _rss_anon(subject.pid)
        peak = max(peak, rss or 0)
        line = child.stdout.readline() if rss is not None else b""
        if line in (b"done\n", b""):
            break
    peak = max(peak, _rss_anon(subject.pid) or 0)
    assert peak <= LIMIT, f"{detail}: grew to {peak >> 20} MiB past its {LIMIT >> 20} MiB"
    # Held at the limit: the memcg OOM killer ends it (no swap here) instead of 256 MiB.
    assert child.wait(10) != 0
    # What it got after the move, wherever it was charged, fits in what app had left.
    peak_q = 0
    if _where_was_memory_moved(q):
        peak_q = int((ROOT / "memory" / q[1:] / "memory.max_usage_in_bytes").read_text())
    got = kept_in_app + peak_q
    assert got <= LIMIT, f"{detail}: {got >> 20} MiB in all past its {LIMIT >> 20} MiB"
    action.revert(record, ctx)
    assert not any((ROOT / h / q[1:]).exists() for h in HIERARCHIES)


# 16 MiB where it starts, then 8 MiB more (once moved) per line on stdin; bounded.
TWO_STEPS = textwrap.dedent(
    """
    import sys
    chunks = [b"\x01" * (16 << 20)]
    print("a", flush=True)
    sys.stdin.readline()
    chunks.append(b"\x01" * (8 << 20))
    print("b", flush=True)
    sys.stdin.readline()
    """
)


def test_a_later_step_keeps_the_quarantine_caps_an_earlier_one_set(box: Box) -> None:
    """quarantine leaves the process under its own memory limit (v1: it is not moved in the
    memory hierarchy at all); limit_memory then moves it into the quarantine's memory cgroup
    with the room its origin had left, and a later step keeps that cap: neither looser (1 GiB)
    nor cut by what it has charged in the quarantine itself."""
    app = box.mkdir("memory", "app")
    (ROOT / "memory" / app[1:] / "memory.limit_in_bytes").write_text(str(LIMIT))
    where = {h: box.top for h in HIERARCHIES[:4]} | {"memory": app}
    subject = box.spawn(
        [sys.executable, "-c", TWO_STEPS], where, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    child = box.children[-1]
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline() == b"a\n"
    ctx = box.ctx()
    first = Quarantine().undo(QuarantineParams(), subject, ctx, policy="p", ttl_s=60, now_wall=1)
    Quarantine().run(QuarantineParams(), subject, ctx)
    assert _where(subject.pid)["memory"] == app  # still under exactly its own limit
    q = ctx.quarantine_of(subject)
    limit_file = ROOT / "memory" / q[1:] / "memory.limit_in_bytes"
    params = LimitMemoryParams.model_validate({"high": "1Gi"})
    second = LimitMemory().undo(params, subject, ctx, policy="p", ttl_s=60, now_wall=1)
    LimitMemory().run(params, subject, ctx)
    room = int(limit_file.read_text())
    assert room < LIMIT  # what app had left, not 1 GiB
    child.stdin.write(b"go\n")
    child.stdin.flush()
    assert child.stdout.readline() == b"b\n"  # 8 MiB charged to the quarantine now
    third = LimitMemory().undo(params, subject, ctx, policy="p", ttl_s=60, now_wall=1)
    LimitMemory().run(params, subject, ctx)
    assert int(limit_file.read_text()) == room
    LimitMemory().revert(third, ctx)
    assert int(limit_file.read_text()) == room
    LimitMemory().revert(second, ctx)
    Quarantine().revert(first, ctx)
    assert _where(subject.pid)["memory"] == app


def test_limit_memory_in_place_writes_a_hard_limit_on_v1(box: Box) -> None:
    where = {h: box.mkdir(h, "app") for h in HIERARCHIES[:4]}  # in place: one path for all
    app = where["memory"]
    subject = box.spawn(["sleep", "30"], where)
    ctx = ActionContext(box.driver, ProcFS(), f"{box.top}/q", scope="cgroup")
    params = LimitMemoryParams.model_validate({"high": "48Mi"})
    record = LimitMemory().undo(params, subject, ctx, policy="p", ttl_s=60, now_wall=1000)
    LimitMemory().run(params, subject, ctx)
    files = ROOT / "memory" / app[1:]
    assert int((files / "memory.limit_in_bytes").read_text()) == 48 << 20
    assert int((files / "memory.soft_limit_in_bytes").read_text()) == 48 << 20
    LimitMemory().revert(record, ctx)
    assert int((files / "memory.limit_in_bytes").read_text()) > 1 << 60


def test_a_quarantine_keeps_a_tighter_pids_and_cpu_cap(box: Box) -> None:
    a = box.mkdir("pids", "a")
    b = box.mkdir("cpu", "b")
    (ROOT / "pids" / box.name / "a" / "pids.max").write_text("5")
    (ROOT / "cpu" / box.name / "b" / "cpu.cfs_period_us").write_text("100000")
    (ROOT / "cpu" / box.name / "b" / "cpu.cfs_quota_us").write_text("10000")
    top = {h: box.top for h in HIERARCHIES[:4]}
    subject = box.spawn(["sleep", "30"], top | {"pids": a, "cpu": b})
    ctx = box.ctx()
    Quarantine().run(QuarantineParams(pids_max=32, cpu=0.5), subject, ctx)
    q = ctx.quarantine_of(subject)[1:]
    assert (ROOT / "pids" / q / "pids.max").read_text().strip() == "5"
    assert (ROOT / "cpu" / q / "cpu.cfs_quota_us").read_text().strip() == "10000"


# --- 6. undo per hierarchy -------------------------------------------------------------------


def _apart(box: Box) -> dict[str, str]:
    """A different cgroup in each hierarchy, as on real v1 hosts (a unit's pids cgroup,
    cpu at a slice, memory elsewhere). The memory one has a limit, so a quarantine moves the
    process in the memory hierarchy too (to keep it); freezer stays where it is."""
    homes = {h: box.mkdir(h, f"{h}-home") for h in HIERARCHIES[:4]}
    (ROOT / "memory" / homes["memory"][1:] / "memory.limit_in_bytes").write_text(str(1 << 30))
    return homes


def _in_quarantine(pid: int, q: str, homes: dict[str, str]) -> bool:
    where = _where(pid)
    return where["pids"] == where["cpu"] == q and where["freezer"] == homes["freezer"]


def _undoer(path: Path, box: Box, clock: FakeClock) -> Undoer:
    return Undoer(Journal(path, clock), box.ctx(), clock, ACTIONS)


@pytest.mark.parametrize("how", ["release", "shutdown"])
def test_undo_restores_every_hierarchy(box: Box, tmp_path: Path, how: str) -> None:
    homes = _apart(box)
    subject = box.spawn(["sleep", "30"], homes)
    clock = FakeClock()
    undoer = _undoer(tmp_path / "undo.jsonl", box, clock)
    try:
        undoer.apply(Quarantine(), QuarantineParams(), subject, box.ctx(), policy="p", ttl_s=60.0)
        q = box.ctx().quarantine_of(subject)
        assert _in_quarantine(subject.pid, q, homes)
        if how == "release":
            details = undoer.revert_offender(subject, "released by operator")
        else:
            details = undoer.revert_all("agent shutdown")
        assert _where(subject.pid) == homes, details
        assert undoer.journal.active() == [], details
        assert not any((ROOT / h / q[1:]).exists() for h in HIERARCHIES)
    finally:
        undoer.journal.close()


# The first agent: quarantines the pid given, says so, then waits to be SIGKILLed.
AGENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from remedy.actions.base import ActionContext
    from remedy.actions.cgroups import CgroupV1Driver
    from remedy.actions.journal import Journal
    from remedy.actions.params import QuarantineParams
    from remedy.actions.quarantine import Quarantine
    from remedy.actions.registry import ACTIONS
    from remedy.actions.undoer import Undoer
    from remedy.clock import SystemClock
    from remedy.engine.offender import Subject
    from remedy.proc import ProcFS

    journal_path, pid, top = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    driver = CgroupV1Driver(Path("/sys/fs/cgroup"), ProcFS())
    ctx = ActionContext(driver, ProcFS(), top + "/q", scope="process")
    info = ProcFS().read(pid)
    cgroup = ProcFS().cgroups(pid)["pids"]
    subject = Subject(pid, info.start_ticks, info.comm, info.ppid, info.exe, info.uid, False,
                      cgroup, driver.display_path(cgroup))
    undoer = Undoer(Journal(journal_path, SystemClock()), ctx, SystemClock(), ACTIONS)
    undoer.apply(Quarantine(), QuarantineParams(), subject, ctx, policy="p", ttl_s=1.0)
    print("applied", flush=True)
    time.sleep(60)
    """
)


def test_a_replaced_agent_restores_every_hierarchy(box: Box, tmp_path: Path) -> None:
    homes = _apart(box)
    subject = box.spawn(["sleep", "30"], homes)
    path = tmp_path / "undo.jsonl"
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(path), str(subject.pid), box.top],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    box.children.append(agent)
    assert agent.stdout is not None and agent.stdout.readline() == b"applied\n"
    q = box.ctx().quarantine_of(subject)
    assert _in_quarantine(subject.pid, q, homes)
    agent.kill()  # SIGKILL: no shutdown revert, the journal is all that is left
    agent.wait(5)
    clock = FakeClock(wall_offset=time.time() + 3600)  # its 1 s TTL has long passed
    undoer = _undoer(path, box, clock)
    try:
        details = undoer.reconcile()
        assert _where(subject.pid) == homes, details
        assert undoer.journal.active() == [], details
        assert not any((ROOT / h / q[1:]).exists() for h in HIERARCHIES)
    finally:
        undoer.journal.close()


def test_a_revert_that_cannot_restore_stays_open_until_it_can(box: Box, tmp_path: Path) -> None:
    homes = _apart(box)
    subject = box.spawn(["sleep", "30"], homes)
    clock = FakeClock()
    undoer = _undoer(tmp_path / "undo.jsonl", box, clock)
    try:
        undoer.apply(
            ThrottleCpu(), ThrottleCpuParams(cpu=0.25), subject, box.ctx(), policy="p", ttl_s=60
        )
        q = box.ctx().quarantine_of(subject)
        os.rmdir(ROOT / "cpu" / homes["cpu"][1:])  # its cpu home is gone meanwhile
        first = undoer.revert_offender(subject, "released by operator")
        assert "revert failed" in first[0], first
        assert _where(subject.pid)["cpu"] == q  # still capped: so the record is open
        assert [r.id for r, _ in undoer.stuck()] == [r.id for r in undoer.journal.active()]
        # The retry, however it goes, must not call that done while it still sits there.
        clock.advance(RETRY_FIRST_S)
        second = undoer.expire()
        assert second and "revert failed" in second[0], second
        assert _where(subject.pid)["cpu"] == q and len(undoer.journal.active()) == 1
        assert undoer.journal.failures()[undoer.journal.active()[0].id].attempts == 2
        (ROOT / "cpu" / homes["cpu"][1:]).mkdir()  # its home is back
        assert undoer.expire() == []  # backing off: 10 s after the second failure
        clock.advance(2 * RETRY_FIRST_S)
        third = undoer.expire()
        assert _where(subject.pid) == homes, third
        assert undoer.journal.active() == [] and undoer.stuck() == []
        assert not any((ROOT / h / q[1:]).exists() for h in HIERARCHIES)
    finally:
        undoer.journal.close()


# Allocates and touches 16 MiB once told to, then reports and waits to be killed.
ALLOC_16 = textwrap.dedent(
    """
    import sys, time
    sys.stdin.readline()
    block = bytearray(16 << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    print("allocated", flush=True)
    time.sleep(30)
    """
)


def _fill_page_cache(box: Box, where: dict[str, str], tmp: Path) -> None:
    """Write a 96 MiB file from inside ``where``: its page cache is charged there, up to the
    limit (older pages reclaimed), and stays after the writer exits."""
    argv = ["dd", "if=/dev/zero", f"of={tmp / 'big'}", "bs=1M", "count=96", "status=none"]
    box.spawn(argv, where)
    assert box.children[-1].wait(30) == 0
    app = ROOT / "memory" / where["memory"][1:]
    used = int((app / "memory.usage_in_bytes").read_text())
    assert used > LIMIT - (8 << 20), f"the page cache did not fill the cgroup ({used >> 20} MiB)"


@pytest.mark.parametrize(
    ("action", "params"),
    [
        (Quarantine(), QuarantineParams(pids_max=16, cpu=0.5)),
        (ThrottleCpu(), ThrottleCpuParams(cpu=0.5)),
    ],
    ids=["quarantine", "throttle_cpu"],
)
def test_page_cache_in_the_origin_never_makes_a_move_an_oom_kill(
    box: Box, action: Quarantine | CgroupAction, params: ActionParams, tmp_path: Path
) -> None:
    """The origin's memory limit is full of page cache (reclaimable). A step that sets no
    memory limit leaves the process in its own memory cgroup on v1, under exactly its limit:
    it must still be able to allocate what it could at home (16 MiB of 64)."""
    app = box.mkdir("memory", "app")
    (ROOT / "memory" / app[1:] / "memory.limit_in_bytes").write_text(str(LIMIT))
    where = {h: box.top for h in HIERARCHIES[:4]} | {"memory": app}
    _fill_page_cache(box, where, tmp_path)
    subject = box.spawn(
        [sys.executable, "-c", ALLOC_16], where, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    child = box.children[-1]
    assert child.stdin is not None and child.stdout is not None
    ctx = box.ctx()
    record = action.undo(params, subject, ctx, policy="p", ttl_s=60.0, now_wall=1000.0)
    action.run(params, subject, ctx)
    assert _where(subject.pid)["memory"] == app, "moved out from under its own memory limit"
    child.stdin.write(b"go\n")
    child.stdin.flush()
    assert child.stdout.readline() == b"allocated\n", "OOM-killed by remedy's move"
    assert child.poll() is None
    action.revert(record, ctx)


def test_the_room_a_limit_memory_quarantine_inherits_leaves_out_page_cache(
    box: Box, tmp_path: Path
) -> None:
    app = box.mkdir("memory", "app")
    (ROOT / "memory" / app[1:] / "memory.limit_in_bytes").write_text(str(LIMIT))
    where = {h: box.top for h in HIERARCHIES[:4]} | {"memory": app}
    _fill_page_cache(box, where, tmp_path)
    got = box.driver.inherited(where)
    assert got.memory_max is not None
    # Cache is reclaimed before an OOM kill: nearly the whole limit is room (was ~1 MiB).
    assert got.memory_max > LIMIT - (8 << 20), got.memory_max >> 20
