"""Cgroup signals mean a cgroup (issue 10, item 9), against a v1-shaped fixture tree.

A cgroup-keyed record names the cgroup by the inode of its directory in the hierarchy the keys
come from (pids on v1 and hybrid hosts). Identification resolves that inode to a path in that
hierarchy, checks it, and makes the cgroup the offender; the process whose event crossed is
context only, so it may be long gone (here it never existed) without the cgroup escaping. The
engine keys the offender by (inode, policy), so its ladder escalates window after window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from remedy.actions.cgroups import CgroupV1Driver
from remedy.actions.params import KillParams, QuarantineParams
from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import IdentityUnverified
from remedy.policy import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.proc import ProcFS
from remedy.sensors.context import CgroupIndex, Enricher, ParentChain
from remedy.sensors.identify import ProcIdentifier, RootCgroup
from remedy.sensors.records import SensorRecord
from remedy.sensors.sampler import cgroup_key

GONE = 4_000_000  # above pid_max: the crossing process exists nowhere (it exited long ago)
AGENT = 999


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """/sys/fs/cgroup of a v1 host: pids and cpu hierarchies, /bomb (with a child cgroup of
    its own) and /quiet in both."""
    top = tmp_path / "cgroup"
    for hierarchy in ("pids", "cpu"):
        for rel in ("", "bomb", "bomb/sub", "quiet"):
            d = top / hierarchy / rel
            d.mkdir(parents=True, exist_ok=True)
            (d / "cgroup.procs").write_text("")
            (d / "tasks").write_text("")
    (top / "pids" / "bomb" / "cgroup.procs").write_text("3001\n3002\n")
    (top / "pids" / "bomb" / "sub" / "cgroup.procs").write_text("3003\n")
    return top


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    d = tmp_path / "proc"
    d.mkdir()
    return d


def inode(root: Path, rel: str) -> int:
    return os.stat(root / "pids" / rel.lstrip("/")).st_ino


def record(key: int, tgid: int = GONE, signal: str = "fork_rate_cgroup") -> SensorRecord:
    return SensorRecord(
        signal=signal,
        tgid=tgid,
        pid=tgid,
        ppid=1,
        comm="bomb",
        cgroup_id=1,  # cgroup2's root: every process is there on a hybrid host
        count=1000,
        window_s=1.0,
        elapsed_s=0.4,
        ts_boot_ns=2**62,
        key=key,
    )


def identifier(proc: Path, root: Path) -> ProcIdentifier:
    procfs = ProcFS(proc)
    driver = CgroupV1Driver(root, procfs)
    enricher = Enricher(procfs, None, ParentChain(procfs), proc_cgroup=driver.cgroup_of)
    index = CgroupIndex.for_keys(root, min_rescan_s=0.0)
    return ProcIdentifier(procfs, driver, enricher, key_index=index)


def test_the_offender_is_the_cgroup_named_by_its_pids_inode(proc: Path, root: Path) -> None:
    subject = identifier(proc, root).identify(record(inode(root, "/bomb")))
    assert subject.is_cgroup
    assert (subject.cgroup, subject.cgroup_inode) == ("/bomb", inode(root, "/bomb"))
    assert subject.cgroup_display == str(root / "pids" / "bomb")
    assert subject.key == (0, inode(root, "/bomb"))  # no process: never a process's key
    assert [m.pid for m in subject.members] == [3001, 3002, 3003]  # its whole subtree
    assert subject.context is not None
    assert subject.context.cgroup_path == "/bomb"  # the hierarchy acted on, not cgroup2's "/"
    assert subject.context.summary().startswith("cgroup /bomb")
    assert subject.handle is not None and not subject.handle.has_exited()


def test_the_root_is_never_an_offender(proc: Path, root: Path) -> None:
    with pytest.raises(RootCgroup):
        identifier(proc, root).identify(record(inode(root, "/")))


def test_an_unknown_key_is_refused(proc: Path, root: Path) -> None:
    with pytest.raises(IdentityUnverified):
        identifier(proc, root).identify(record(inode(root, "/bomb") + 10_000))


def test_a_cgroup_replaced_under_the_same_name_is_not_the_one_counted(
    proc: Path, root: Path
) -> None:
    ident = identifier(proc, root)
    old = inode(root, "/quiet")
    assert ident.identify(record(old)).cgroup == "/quiet"  # the index has learned /quiet
    d = root / "pids" / "quiet"
    (d / "cgroup.procs").unlink()
    (d / "tasks").unlink()
    d.rmdir()
    (root / "pids" / "elsewhere").mkdir()  # keep the old inode number from being handed out
    d.mkdir()
    (d / "cgroup.procs").write_text("")
    assert inode(root, "/quiet") != old
    with pytest.raises(IdentityUnverified, match="another cgroup now"):
        ident.identify(record(old))


def test_its_pin_exits_when_the_cgroup_is_removed(proc: Path, root: Path) -> None:
    subject = identifier(proc, root).identify(record(inode(root, "/quiet")))
    assert subject.handle is not None and not subject.handle.has_exited()
    for hierarchy in ("pids", "cpu"):
        d = root / hierarchy / "quiet"
        for name in ("cgroup.procs", "tasks"):
            (d / name).unlink()
        d.rmdir()
    assert subject.handle.has_exited()


def write_me(proc: Path, cgroup: str) -> int:
    """This test process in the fixture /proc (pidfd_open needs a live pid), started at tick 1
    and in ``cgroup``; also the reader's own /proc/self."""
    me = os.getpid()
    (proc / "self").symlink_to(str(me))
    (proc / str(me)).mkdir()
    after = ["S", "1", str(me), str(me), "0", "-1", "4194304"]
    after += [str(n) for n in range(10, 22)] + ["1", "12345", "67"]
    (proc / str(me) / "stat").write_text(f"{me} (forker) {' '.join(after)}\n")
    (proc / str(me) / "status").write_text("Name:\tforker\nUid:\t0\t0\t0\t0\n")
    (proc / str(me) / "cmdline").write_bytes(b"forker\0")
    (proc / str(me) / "cgroup").write_text(cgroup)
    return me


def sampled(key: int, tgid: int) -> SensorRecord:
    return replace(record(key, tgid=tgid), sampled=True, cgroup_id=0)


def test_a_sampled_record_names_the_cgroup_its_crossing_process_is_in(
    proc: Path, root: Path
) -> None:
    me = write_me(proc, "8:pids:/bomb\n0::/\n")
    (root / "pids" / "bomb" / "cgroup.procs").write_text(f"{me}\n")
    subject = identifier(proc, root).identify(sampled(cgroup_key("/bomb"), me))
    assert (subject.cgroup, subject.cgroup_inode) == ("/bomb", inode(root, "/bomb"))


def test_a_sampled_record_of_another_cgroup_or_the_root_is_refused(proc: Path, root: Path) -> None:
    me = write_me(proc, "8:pids:/bomb\n0::/\n")
    (root / "pids" / "bomb" / "cgroup.procs").write_text(f"{me}\n")
    ident = identifier(proc, root)
    # The sampler keyed cgroup2's "/" (where a hybrid host has everyone); we are in /bomb.
    with pytest.raises(IdentityUnverified, match="no longer in the cgroup counted"):
        ident.identify(sampled(cgroup_key("/"), me))
    (root / "pids" / "bomb" / "cgroup.procs").write_text("")
    (root / "pids" / "cgroup.procs").write_text(f"{me}\n")
    (proc / str(me) / "cgroup").write_text("8:pids:/\n0::/\n")
    with pytest.raises(RootCgroup):
        ident.identify(sampled(cgroup_key("/"), me))


# -- the engine: one offender per (cgroup inode, policy), escalating ------------------------

POLICY = Policy(
    name="fork-bomb-cgroup",
    file=Path("policies/fork-bomb-cgroup.yaml"),
    signal="fork_rate_cgroup",
    threshold=1000,
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
    # Step scopes as a playbook shared with process signals would give them.
    steps=(
        Step("quarantine", QuarantineParams()),
        Step("kill", KillParams(), scope="process", scope_set=True),
    ),
)


@dataclass
class Executed:
    action: str
    scope: str
    subject: Subject


@dataclass
class Executor:
    ran: list[Executed] = field(default_factory=list)

    def describe(self, step: Step, subject: Subject) -> str:
        return f"{step.action} {subject.cgroup}"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        self.ran.append(Executed(step.action, step.scope, subject))
        return ""

    def release(self, subject: Subject) -> None:
        pass


@dataclass
class Sink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


def engine(proc: Path, root: Path) -> tuple[Engine, FakeClock, Executor, Sink]:
    clock, executor, sink = FakeClock(), Executor(), Sink()
    eng = Engine(
        PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK}),
        identifier=identifier(proc, root),
        executor=executor,
        sink=sink,
        clock=clock,
        protector=Protector(AGENT, frozenset({1})),
    )
    return eng, clock, executor, sink


def test_a_cgroup_ladder_escalates_window_after_window(proc: Path, root: Path) -> None:
    eng, clock, executor, sink = engine(proc, root)
    bomb = inode(root, "/bomb")
    # Each window's crossing is made by another short-lived process of the same cgroup.
    for window, crossing in enumerate((GONE, GONE + 1, GONE + 2)):
        eng.on_record(record(bomb, tgid=crossing))
        clock.advance(2.5)  # past the cooldown
        eng.tick()
        assert len(list(eng.offenders())) == 1, f"window {window}"
    assert [(e.action, e.scope) for e in executor.ran] == [
        ("quarantine", "cgroup"),
        ("kill", "cgroup"),  # the step's process scope cannot narrow a cgroup offender
        ("kill", "cgroup"),
    ]
    assert {e.subject.cgroup for e in executor.ran} == {"/bomb"}
    assert [d.step for d in sink.decisions] == [0, 1, 1]
    assert sink.decisions[0].message.startswith(
        f"quarantine cgroup {root / 'pids' / 'bomb'} (inode {bomb})"
    )
    assert {d.pid for d in sink.decisions} == {0}  # no crossing process was ever the offender


def test_two_cgroups_are_two_offenders(proc: Path, root: Path) -> None:
    eng, _clock, executor, _sink = engine(proc, root)
    eng.on_record(record(inode(root, "/bomb")))
    eng.on_record(record(inode(root, "/quiet")))
    assert [(e.action, e.subject.cgroup) for e in executor.ran] == [
        ("quarantine", "/bomb"),
        ("quarantine", "/quiet"),
    ]


def test_a_cgroup_holding_the_agent_is_protected(proc: Path, root: Path) -> None:
    (root / "pids" / "bomb" / "sub" / "cgroup.procs").write_text(f"{AGENT}\n")
    eng, _clock, executor, sink = engine(proc, root)
    eng.on_record(record(inode(root, "/bomb")))
    assert executor.ran == []
    assert sink.decisions[0].outcome == "skipped"
    assert f"holds pid {AGENT}" in sink.decisions[0].reason


def test_a_removed_cgroup_is_released(proc: Path, root: Path) -> None:
    eng, clock, _executor, _sink = engine(proc, root)
    eng.on_record(record(inode(root, "/quiet")))
    assert len(list(eng.offenders())) == 1
    for hierarchy in ("pids", "cpu"):
        d = root / hierarchy / "quiet"
        for name in ("cgroup.procs", "tasks"):
            (d / name).unlink()
        d.rmdir()
    clock.advance(2.5)
    eng.tick()  # cooled
    eng.tick()  # gone: released
    assert list(eng.offenders()) == []


def test_each_window_judges_the_cgroup_as_it_is_now(proc: Path, root: Path) -> None:
    """The offender keeps its ladder, not its first snapshot: the agent joined the cgroup after
    the first window, so the next step is refused."""
    eng, clock, executor, sink = engine(proc, root)
    bomb = inode(root, "/bomb")
    eng.on_record(record(bomb))
    (root / "pids" / "bomb" / "cgroup.procs").write_text(f"3001\n{AGENT}\n")
    clock.advance(2.5)
    eng.tick()
    eng.on_record(record(bomb, tgid=GONE + 1))
    assert [e.action for e in executor.ran] == ["quarantine"]
    assert (sink.decisions[1].outcome, sink.decisions[1].step) == ("skipped", 1)
    assert f"holds pid {AGENT}" in sink.decisions[1].reason


def test_a_process_offender_context_names_the_hierarchy_acted_on(
    proc: Path, root: Path, tmp_path: Path
) -> None:
    """On a hybrid host the record's cgroup2 id is "/" for nearly every process: the context
    names the pids cgroup the driver acts on instead. (The pinned process is this test's own,
    which pidfd_open needs alive; what /proc says about it is the fixture's.)"""
    me = write_me(proc, "8:pids:/bomb\n0::/\n")
    (root / "pids" / "bomb" / "cgroup.procs").write_text(f"{me}\n")
    unified = tmp_path / "unified"
    unified.mkdir()
    procfs = ProcFS(proc)
    driver = CgroupV1Driver(root, procfs)
    v2 = CgroupIndex(unified, min_rescan_s=0.0)
    enricher = Enricher(procfs, v2, ParentChain(procfs), proc_cgroup=driver.cgroup_of)
    ticks_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    rec = SensorRecord(
        "fork_rate", me, me, 1, "forker", os.stat(unified).st_ino, 200, 1.0, 0.1, 2**62,
        key=me, birth_ns=ticks_ns, key_birth_ns=ticks_ns,
    )  # fmt: skip
    assert enricher.enrich(rec).cgroup_path == "/"  # what the cgroup2 id alone says
    subject = ProcIdentifier(procfs, driver, enricher).identify(rec)
    try:
        assert subject.cgroup == "/bomb"
        assert subject.context is not None and subject.context.cgroup_path == "/bomb"
    finally:
        assert subject.handle is not None
        subject.handle.close()


def test_a_cgroup_holding_a_protected_executable_is_protected(proc: Path, root: Path) -> None:
    member = proc / "3002"
    member.mkdir()
    after = ["S", "1", "3002", "3002", "0", "-1", "4194304"]
    after += [str(n) for n in range(10, 22)] + ["1", "12345", "67"]
    (member / "stat").write_text(f"3002 (sshd) {' '.join(after)}\n")
    (member / "status").write_text("Name:\tsshd\nUid:\t0\t0\t0\t0\n")
    (member / "cmdline").write_bytes(b"sshd\0")
    (member / "exe").symlink_to("/usr/sbin/sshd")
    eng, _clock, executor, sink = engine(proc, root)
    eng.on_record(record(inode(root, "/bomb")))
    assert executor.ran == []
    assert "holds pid 3002, protected executable /usr/sbin/sshd" in sink.decisions[0].reason
