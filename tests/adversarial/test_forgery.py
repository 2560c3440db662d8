"""Forgery by an unprivileged user, on real kernel objects: what remedy reads is the truth.

The test delegates a cgroup2 subtree to ``nobody`` the way systemd delegates one (the directory
and its cgroup.procs chowned to the user), inside the test's own pids-limited sandbox. A child
that drops to ``nobody`` first then creates cgroups whose names fake lines of
/proc/pid/cgroup after \\x1c and every other character str.splitlines() breaks at (the kernel
refuses \\n in cgroup names), moves itself into them, and sets comms that fake the Uid line of
/proc/pid/status or play with ")" and "\\n". remedy's /proc reader, its drivers and its
identification must report the true cgroup, uid and comm, and policies must select what the
truth calls for. The child is the only process signalled (by the sandbox's cleanup), and every
cgroup it made is removed with the sandbox.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remedy.actions.cgroups import CgroupV2Driver, detect
from remedy.engine.engine import facts_of
from remedy.engine.offender import Subject
from remedy.policy import Policy, RateLimit, Selector
from remedy.policy.model import NOTHING
from remedy.proc import ProcFS
from remedy.sensors.context import CgroupIndex, Enricher, ParentChain
from remedy.sensors.identify import ProcIdentifier
from remedy.sensors.records import SensorRecord
from testkit.sandbox import CGROUP_ROOT, CgroupSandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

NOBODY = 65534
VICTIM = "/system.slice/victim.service"

# Runs as root only until its first two lines: then it is nobody (real, effective and saved
# ids, no groups) for everything it does. Commands on stdin, hex-encoded so any byte passes:
# "cg <rel>" makes <delegated>/<rel> (parents too) and moves itself in; "comm <name>" sets its
# comm with prctl(PR_SET_NAME). Each is answered "ok" or "err <why>". EOF ends it.
CHILD = r"""
import ctypes, os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
libc = ctypes.CDLL(None, use_errno=True)
base = sys.argv[1].encode()
print("ready", os.getresuid(), os.getresgid(), flush=True)
for line in sys.stdin:
    verb, arg = line.split()
    value = bytes.fromhex(arg)
    try:
        if verb == "cg":
            path = os.path.join(base, value)
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, b"cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        elif verb == "comm":
            if libc.prctl(15, value, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl")
        print("ok", flush=True)
    except OSError as err:
        print("err", err, flush=True)
"""


def _pids_hierarchy_id() -> str:
    for line in Path("/proc/self/cgroup").read_bytes().decode().split("\n"):
        if line.split(":")[1:2] == ["pids"]:
            return line.split(":")[0]
    return "8"  # pure v2: no pids line to fake; any id makes the same text


PIDS = _pids_hierarchy_id()
# Every character str.splitlines() breaks at besides "\n"; the kernel allows each of them in a
# cgroup name. (It refuses "\n" itself since Linux 4.13, in cgroup_mkdir() and
# cgroup1_rename(), "to prevent making /proc/<pid>/cgroup unparsable": checked below, and the
# parse of a "\n" that older kernels let through is covered by tests/unit/test_proc.py.)
BREAKS = ("\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
# Relative to the delegated directory, each fakes a line after a break: the v2 one, or the
# pids line the v1 driver acts on (hybrid hosts).
FORGED_CGROUPS = [f"x{brk}0::{VICTIM}" for brk in BREAKS] + [
    f"x{brk}{PIDS}:pids:{VICTIM}" for brk in BREAKS
]
FORGED_IDS = [f"{ord(b):x}-v2" for b in BREAKS] + [f"{ord(b):x}-pids" for b in BREAKS]
# Not UTF-8 at all: the bytes must reach selectors and the kernel unchanged.
FORGED_CGROUPS.append(os.fsdecode(b"\xff\xfe\x1c0::") + VICTIM)
FORGED_IDS.append("non-utf8-v2")
# At most 15 bytes each (TASK_COMM_LEN 16 with its NUL).
FORGED_COMMS = (
    "\x1cUid:\t0",
    "\x1cUid:\t0\t0\t0",
    "\u2028Uid:\t0\t0",
    "Uid:\t0\t0\t0",  # psutil's uids() regex reads this Name line as uid 0
    "a)\n(b) R 1 1",
    ") (",
    "x\ny",
    "\\n",
)


@dataclass
class Forger:
    """The unprivileged child and where its delegated subtree is."""

    proc: subprocess.Popen[bytes]
    box: CgroupSandbox
    delegated: Path  # the sandbox's cgroup2 directory
    v2_root: Path  # the cgroup2 mount

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, verb: str, value: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{verb} {os.fsencode(value).hex()}\n".encode())
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip() or "child died"

    def ask(self, verb: str, value: str) -> None:
        """Have the child do it; fails the test if it could not."""
        answer = self._send(verb, value)
        assert answer == "ok", f"{verb} {value!r}: {answer}"

    def refused(self, verb: str, value: str) -> str:
        """What the kernel said when the child tried; fails the test if it succeeded."""
        answer = self._send(verb, value)
        assert answer.startswith("err"), f"{verb} {value!r}: {answer}"
        return answer

    def v2_rel(self, name: str) -> str:
        """The true cgroup2 path of ``name`` (relative to the delegated directory)."""
        return f"{self.box.rel}/{name}"


@pytest.fixture
def forger(test_cgroup: CgroupSandbox) -> Iterator[Forger]:
    delegated = test_cgroup.dirs[0] if test_cgroup.v2 else test_cgroup.dirs[-1]
    assert test_cgroup.has_cgroup_id, "this test needs a cgroup2 mount to delegate from"
    # systemd's delegation: the directory and the files a delegatee writes become the user's.
    for path in (delegated, *(delegated / f for f in ("cgroup.procs", "cgroup.threads"))):
        os.chown(path, NOBODY, NOBODY)
    proc = test_cgroup.spawn(
        [sys.executable, "-I", "-c", CHILD, str(delegated)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().decode()
        assert ready.startswith("ready (65534, 65534, 65534) (65534, 65534, 65534)"), ready
        yield Forger(proc, test_cgroup, delegated, delegated.parent)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.stdout is not None:
            proc.stdout.close()
        # The sandbox's cleanup kills what is left of it and removes every cgroup it made.


def _identify(forger: Forger, v2_rel: str) -> Subject:
    """Identification as the agent does it, from a record the kernel could have made now for
    the child in its cgroup2 directory ``v2_rel`` (the id BPF reports is that inode)."""
    procfs = ProcFS()
    driver = detect(CGROUP_ROOT, procfs)
    index = CgroupIndex.detect(CGROUP_ROOT)
    enricher = Enricher(procfs, index, ParentChain(procfs), proc_cgroup=driver.cgroup_of)
    cgroup_id = (forger.v2_root / v2_rel.lstrip("/")).stat().st_ino
    # No kernel sensor here: the birth at /proc's resolution (checked to the tick).
    birth = procfs.read(forger.pid).start_ticks * 1_000_000_000 // procfs.clock_ticks()
    record = SensorRecord(
        signal="fork_rate",
        tgid=forger.pid,
        pid=forger.pid,
        ppid=os.getpid(),
        comm="",
        cgroup_id=cgroup_id,
        count=200,
        window_s=1.0,
        elapsed_s=0.1,
        ts_boot_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME),
        key=forger.pid,
        birth_ns=birth,
        key_birth_ns=birth,
    )
    return ProcIdentifier(procfs, driver, enricher).identify(record)


def _release(subject: Subject) -> None:
    if subject.handle is not None:
        subject.handle.close()


def _policy(match: Selector = NOTHING, exclude: Selector = NOTHING) -> Policy:
    return Policy(
        name="fork-bomb",
        file=Path("policies/fork-bomb.yaml"),
        signal="fork_rate",
        threshold=200,
        window_s=1.0,
        playbook="contain",
        dry_run=False,
        cooldown_s=2.0,
        release_after_s=10.0,
        rate_limit=RateLimit(max_actions=3, per_s=60.0),
        match=match,
        exclude=exclude,
    )


# What an operator writes to spare system services and root's processes.
SPARE_SYSTEM = _policy(exclude=Selector(cgroups=("/system.slice/*",), uids=(0,)))
ONLY_SYSTEM = _policy(match=Selector(cgroups=("/system.slice/*",)))


@pytest.mark.parametrize("name", FORGED_CGROUPS, ids=FORGED_IDS)
def test_a_forged_cgroup_name_reads_as_the_truth(forger: Forger, name: str) -> None:
    forger.ask("cg", name)
    true_v2 = forger.v2_rel(name)
    procfs = ProcFS()
    # The kernel agrees about where the child is (the test's ground truth).
    procs = forger.v2_root / true_v2.lstrip("/") / "cgroup.procs"
    assert str(forger.pid) in procs.read_text().split()
    driver = detect(CGROUP_ROOT, procfs)
    # The driver's own hierarchy: pids on v1 (the sandbox's, untouched by the child), else v2.
    truth = forger.box.rel if driver.version == 1 else true_v2
    assert driver.cgroup_of(forger.pid) == truth
    assert CgroupV2Driver(forger.v2_root, procfs).cgroup_of(forger.pid) == true_v2
    subject = _identify(forger, true_v2)
    try:
        facts = facts_of(subject)
        assert (facts.cgroup, facts.uid) == (truth, NOBODY)
        # The context names the cgroup of the hierarchy acted on (issue 10 item 9).
        assert subject.context is not None and subject.context.cgroup_path == truth
        assert SPARE_SYSTEM.applies_to(facts) is None  # not a system service: it applies
        assert ONLY_SYSTEM.applies_to(facts) is not None
    finally:
        _release(subject)
    # The record's cgroup id checks out against the directory the path resolves to.
    assert procfs.cgroup2_inode(forger.pid, forger.v2_root) == procs.parent.stat().st_ino


def test_a_forged_comm_reads_as_the_truth(forger: Forger) -> None:
    for comm in FORGED_COMMS:
        forger.ask("comm", comm)
        info = ProcFS().read(forger.pid)
        assert (info.comm, info.uid) == (comm, NOBODY), repr(comm)
        subject = _identify(forger, forger.box.rel)
        try:
            facts = facts_of(subject)
            assert (facts.comm, facts.uid) == (comm, NOBODY), repr(comm)
            assert SPARE_SYSTEM.applies_to(facts) is None, repr(comm)  # not root's: applies
            assert _policy(match=Selector(comms=(comm,))).applies_to(facts) is None
        finally:
            _release(subject)


def test_both_forgeries_at_once(forger: Forger) -> None:
    name, comm = f"x\x1c{PIDS}:pids:{VICTIM}", "\x1cUid:\t0\t0\t0"
    forger.ask("cg", name)
    forger.ask("comm", comm)
    subject = _identify(forger, forger.v2_rel(name))
    try:
        facts = facts_of(subject)
        truth = forger.box.rel if detect().version == 1 else forger.v2_rel(name)
        assert (facts.cgroup, facts.comm, facts.uid) == (truth, comm, NOBODY)
        assert SPARE_SYSTEM.applies_to(facts) is None
    finally:
        _release(subject)


def test_the_kernel_refuses_a_newline_in_a_cgroup_name(forger: Forger) -> None:
    # Why no "\n" forgery runs here: mkdir itself fails (EINVAL) since Linux 4.13.
    for name in (f"x\n0::{VICTIM}", f"x\n{PIDS}:pids:{VICTIM}"):
        assert "Errno 22" in forger.refused("cg", name)
