"""The audit log on a real full filesystem: a 64 KiB tmpfs the test mounts and unmounts. The
kernel's own short write and ENOSPC leave no fragment; steps that can end a process are refused
while the disk is full and run again once it is not; reversible steps never stop."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from remedy.actions.params import KillParams, QuarantineParams
from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import ProcessGone
from remedy.policy import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.sensors.context import Context
from remedy.sensors.records import SensorRecord
from remedy.service.audit import AUDIT_GAP, AuditLog, FanOut
from remedy.tools.auditquery import check

pytestmark = pytest.mark.root

SIZE = 64 * 1024


@dataclass
class TinyFs:
    """A mounted 64 KiB tmpfs and the audit logs opened on it (closed before it is unmounted:
    an open descriptor would keep it busy)."""

    mnt: Path
    logs: list[AuditLog] = field(default_factory=list)

    def audit(self) -> AuditLog:
        log = AuditLog(self.mnt / "audit.jsonl")
        self.logs.append(log)
        return log


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[TinyFs]:
    """A 64 KiB tmpfs, unmounted even when the test fails."""
    if os.geteuid() != 0:
        if os.environ.get("REMEDY_REQUIRE_BPF") == "1":
            pytest.fail("REMEDY_REQUIRE_BPF=1 but not root: cannot mount a tmpfs")
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "full"
    mnt.mkdir()
    source = f"remedy-test-{uuid.uuid4().hex[:8]}"
    options = f"size={SIZE},mode=0700"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, source, str(mnt)], check=True, timeout=30
    )
    fs = TinyFs(mnt)
    try:
        yield fs
    finally:
        for log in fs.logs:
            log.close()
        done = subprocess.run(["umount", str(mnt)], check=False, timeout=30)
        if done.returncode != 0:  # still busy somehow: detach it now, freed on last close
            subprocess.run(["umount", "--lazy", str(mnt)], check=True, timeout=30)
            pytest.fail(f"the test tmpfs at {mnt} was busy at teardown")


def _fill(mnt: Path, leave: int) -> Path:
    """Take all but about ``leave`` bytes of the filesystem."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with filler.open("wb") as f:
        try:
            f.write(b"x" * max(free - leave, 0))
            f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


POLICY = Policy(
    name="fork-bomb",
    file=Path("policies/fork-bomb.yaml"),
    signal="fork_rate",
    threshold=200,
    window_s=1.0,
    playbook="contain",
    dry_run=False,
    cooldown_s=2.0,
    release_after_s=10.0,
    rate_limit=RateLimit(max_actions=10, per_s=60.0),
    match=Selector(),
)
PLAYBOOK = Playbook(
    name="contain",
    file=Path("playbooks/contain.yaml"),
    steps=(Step("quarantine", QuarantineParams()), Step("kill", KillParams())),
)
# A long command line makes each line a few KiB, so the tiny filesystem fills in a few lines.
CONTEXT = Context(42, 1, 0, "forker", "/usr/bin/forker", "forker " + "a" * 3000, "/a", None, ())


@dataclass
class Identifier:
    def identify(self, record: SensorRecord) -> Subject:
        if record.tgid != 42:
            raise ProcessGone("exited", pid=record.tgid)
        return Subject(
            42, 1042, "forker", 1, "/usr/bin/forker", 0, False, "/a", "/cg/a", context=CONTEXT
        )


@dataclass
class Executor:
    ran: list[str] = field(default_factory=list)

    def describe(self, step: Step, subject: Subject) -> str:
        return f"{step.action} pid {subject.pid}"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        self.ran.append(step.action)
        return ""

    def release(self, subject: Subject) -> None:
        pass


@dataclass
class Seen:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


def _record() -> SensorRecord:
    return SensorRecord("fork_rate", 42, 42, 1, "forker", 1, 200, 1.0, 0.2, 0)


def _lines(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the audit file ends in a fragment"
    return [json.loads(raw) for raw in data.splitlines()]


def test_a_full_filesystem_leaves_no_fragment_and_the_chain_verifies(tiny_fs: TinyFs) -> None:
    audit = tiny_fs.audit()
    path = audit.path
    _fill(tiny_fs.mnt, leave=8 * 1024)
    decision = Decision(
        time=1_800_000_000.0, policy="fork-bomb", signal="fork_rate", pid=42, start_ticks=1042,
        comm="forker", ppid=1, exe="/usr/bin/forker", cgroup="/cg/a", count=200, window_s=1.0,
        action="quarantine", step=0, dry_run=False, outcome="acted", reason="crossed",
        message="quarantine pid 42", state="cooldown", context={"cmdline": CONTEXT.cmdline},
    )  # fmt: skip
    for i in range(20):  # bounded: the disk is full after a handful
        audit.record(replace(decision, pid=1000 + i))
    assert audit.stats.failed_writes > 0
    assert not audit.available
    written = _lines(path)
    assert 0 < len(written) < 20
    assert check(path).broken is None

    (tiny_fs.mnt / "filler").unlink()
    audit.record(replace(decision, pid=2000))
    audit.close()
    after = _lines(path)
    assert after[len(written)]["event"] == AUDIT_GAP
    assert after[len(written)]["lost"] == audit.stats.lost == 20 - len(written)
    assert after[-1]["pid"] == 2000
    report = check(path)
    assert (report.broken, report.unfinished) == (None, ())


def test_a_kill_is_refused_on_a_full_disk_and_a_quarantine_still_runs(tiny_fs: TinyFs) -> None:
    audit = tiny_fs.audit()
    path = audit.path
    clock, executor, seen = FakeClock(), Executor(), Seen()
    engine = Engine(
        PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK}),
        identifier=Identifier(),
        executor=executor,
        sink=FanOut([seen, audit]),
        clock=clock,
        protector=Protector(os.getpid(), frozenset({1})),
    )
    filler = _fill(tiny_fs.mnt, leave=0)

    def next_step() -> None:
        clock.advance(3.0)
        engine.tick()
        engine.on_record(_record())

    engine.on_record(_record())  # quarantine: reversible, goes on
    next_step()  # kill: its intent cannot be written, so it does not run
    assert executor.ran == ["quarantine"]
    assert [d.outcome for d in seen.decisions] == ["acted", "audit-unavailable"]
    assert path.read_bytes() == b""

    filler.unlink()
    next_step()
    assert executor.ran == ["quarantine", "kill"]
    outcomes = [(e.get("event"), e.get("outcome")) for e in _lines(path)]
    assert outcomes == [("audit-gap", None), (None, "intent"), (None, "acted")]
    report = check(path)
    assert (report.broken, report.unfinished) == (None, ())
    engine.close()
