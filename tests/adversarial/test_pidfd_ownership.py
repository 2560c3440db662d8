"""A pidfd number closed behind its handle's back (CI: ``OSError: [Errno 9]`` from
``ProcessHandle.close`` in ``Engine._offender``).

The cause was native code closing a descriptor it did not own: libbcc before 0.33 closes an
uninitialised ``ModulePath::fd_`` while it builds a process's symbol cache (bcc #5193), and
the agent symbolizes each crossing record's user stack right after pinning its process. The
freed number is reused by the next open, so a handle could hold another process's pidfd. These
tests do to real pidfds of the test's own children what that bug does, and check that nothing
is signalled through the stranger's pidfd, nothing of someone else's is closed, and the agent
neither crashes nor acts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from remedy.actions.cgroups import CgroupV2Driver
from remedy.actions.params import KillParams
from remedy.actions.process import ProcessHandle
from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import IdentityUnverified
from remedy.policy import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.proc import ProcFS
from remedy.sensors import kernel
from remedy.sensors.identify import ProcIdentifier
from remedy.sensors.records import SensorRecord

Spawn = Callable[[], "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """`sleep 30` children of this test only; each is killed and reaped at teardown."""
    children: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "30"])
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def alive(child: subprocess.Popen[bytes]) -> bool:
    time.sleep(0.05)  # a SIGKILL, had one been sent, has been delivered by now
    return child.poll() is None


def steal(handle: ProcessHandle, into: int) -> None:
    """What the bug does: the handle's number is closed and reused, here by ``into``'s file."""
    os.dup2(into, handle.fileno(), inheritable=False)


def test_a_pidfd_replaced_by_another_processes_is_never_signalled(spawn: Spawn) -> None:
    offender, stranger = spawn(), spawn()
    handle = ProcessHandle.bind(offender.pid, ProcFS())
    other = os.pidfd_open(stranger.pid)
    try:
        number = handle.fileno()
        steal(handle, other)
        with pytest.raises(IdentityUnverified, match="behind its back"):
            handle.send_signal(signal.SIGKILL)
        assert alive(stranger)
        with pytest.raises(IdentityUnverified):
            handle.has_exited()
        handle.close()
        # The number is the stranger's pidfd now: not ours to close.
        assert is_open(number)
        signal.pidfd_send_signal(number, 0)
        os.close(number)
    finally:
        os.close(other)
        handle.close()


def test_a_pidfd_replaced_by_a_file_is_refused_and_left_open(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn()
    handle = ProcessHandle.bind(child.pid, ProcFS())
    fd = os.open(tmp_path / "journal", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        number = handle.fileno()
        steal(handle, fd)
        with pytest.raises(IdentityUnverified):
            handle.check("a cgroup move")
        handle.close()
        assert is_open(number), "closing the handle closed the file that took its number"
        os.close(number)
    finally:
        os.close(fd)


def test_a_pidfd_closed_behind_its_back_closes_quietly_and_refuses_to_signal(
    spawn: Spawn,
) -> None:
    child = spawn()
    handle = ProcessHandle.bind(child.pid, ProcFS())
    os.close(handle.fileno())
    with pytest.raises(IdentityUnverified):
        handle.send_signal(signal.SIGKILL)
    handle.close()  # was: OSError EBADF
    assert alive(child)


def test_its_own_pidfd_still_signals(spawn: Spawn) -> None:
    child = spawn()
    with ProcessHandle.bind(child.pid, ProcFS()) as handle:
        handle.verify()
        handle.send_signal(signal.SIGKILL)
        assert handle.wait_exit(5)


# -- the engine, as in CI: a record of a tracked process, its pin's number closed meanwhile --


@dataclass
class Identifier:
    """Pins the test's child through a real pidfd, as ProcIdentifier does; ``then`` runs after
    the pin (where the agent symbolizes the stack) and may do to it what libbcc did."""

    child: subprocess.Popen[bytes]
    then: Callable[[ProcessHandle], None] = lambda _h: None
    handles: list[ProcessHandle] = field(default_factory=list)

    def identify(self, record: SensorRecord) -> Subject:
        handle = ProcessHandle.bind(self.child.pid, ProcFS())
        self.handles.append(handle)
        self.then(handle)
        return Subject.pinned(handle.info, handle, "/t", "/cg/t", cgroup_inode=1)


@dataclass
class Killer:
    """Runs the kill step through the offender's pin, as the kill action does."""

    signalled: list[int] = field(default_factory=list)

    def describe(self, step: Step, subject: Subject) -> str:
        return "SIGKILL through its pidfd"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        assert subject.handle is not None
        subject.handle.send_signal(signal.SIGKILL)
        self.signalled.append(subject.pid)
        return ""

    def release(self, subject: Subject) -> None:
        pass


@dataclass
class Sink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


def _engine(identifier: Identifier, executor: Killer, sink: Sink) -> Engine:
    playbook = Playbook(
        name="kill", file=Path("playbooks/kill.yaml"), steps=(Step("kill", KillParams()),)
    )
    policy = Policy(
        name="fork-bomb",
        file=Path("policies/fork-bomb.yaml"),
        signal="fork_rate",
        threshold=200,
        window_s=1.0,
        playbook="kill",
        dry_run=False,
        cooldown_s=0.0,
        release_after_s=600.0,
        rate_limit=RateLimit(max_actions=100, per_s=1.0),
        match=Selector(),
    )
    return Engine(
        PolicySet((policy,), {"kill": playbook}),
        identifier=identifier,
        executor=executor,
        sink=sink,
        clock=FakeClock(),
        protector=Protector(999_999_999, frozenset({1})),
    )


def _record(pid: int) -> SensorRecord:
    return SensorRecord("fork_rate", pid, pid, 1, "sleep", 1, 500, 1.0, 0.5, 0, key=pid)


def test_a_record_whose_new_pin_was_closed_meanwhile_does_not_crash_the_engine(
    spawn: Spawn,
) -> None:
    """The CI traceback: the offender is tracked, the record's own pidfd (a duplicate, closed
    by ``_offender``) had been closed by someone else first."""
    child = spawn()
    identifier = Identifier(child)
    sink = Sink()
    engine = _engine(identifier, Killer(), sink)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(engine.close)
        engine.dry_run = True
        engine.on_record(_record(child.pid))
        identifier.then = lambda h: os.close(h.fileno())
        engine.on_record(_record(child.pid))  # was: OSError: [Errno 9] Bad file descriptor
    assert alive(child)


def test_an_offender_whose_pin_now_holds_another_processes_pidfd_kills_nobody(
    spawn: Spawn,
) -> None:
    """The danger beyond the crash: the offender's number reused by a pidfd of another process
    (here by dup2, as the next pidfd_open would): the kill step must be refused, not sent."""
    offender, stranger = spawn(), spawn()
    identifier = Identifier(offender)
    killer, sink = Killer(), Sink()
    engine = _engine(identifier, killer, sink)
    other = os.pidfd_open(stranger.pid)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.close, other)
        cleanup.callback(engine.close)
        # Degraded: never a kill on partial data, so it is tracked (observed) and pinned.
        engine.on_record(replace(_record(offender.pid), degraded=True))
        assert not killer.signalled and [o.state for o in engine.offenders()] == ["observed"]
        number = identifier.handles[0].fileno()
        steal(identifier.handles[0], other)
        cleanup.callback(os.close, number)  # the stranger's pidfd now, not the engine's
        engine.on_record(_record(offender.pid))
    assert killer.signalled == []
    assert sink.decisions[-1].outcome == "unverified"
    assert alive(stranger) and alive(offender)


# -- the root cause: libbcc's symbol cache closing a number it never opened ----------------

# Run in a child (its fd table is its own). A zombie's root link cannot be read, so libbcc
# builds the ModulePath of the global /tmp/perf-PID.map without setting its fd_ and closes
# whatever number the recycled heap block holds: malloc's cache of 88-byte blocks is seeded
# with the pidfd's number where a freed ModulePath keeps its own (after the shared_ptr header).
_LIBBCC_CLOSES = """
import ctypes, fcntl, os, sys, time
from bcc.libbcc import bcc_symbol_option, lib
fd = os.pidfd_open(int(sys.argv[1]))
zombie = os.fork()
if zombie == 0:
    os._exit(0)
while open(f"/proc/{zombie}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(88) for _ in range(7)]
for block in blocks:
    ctypes.c_int.from_address(block + 16).value = fd
for block in blocks:
    libc.free(block)
cache = lib.bcc_symcache_new(zombie, ctypes.cast(None, ctypes.POINTER(bcc_symbol_option)))
lib.bcc_free_symcache(cache, zombie)
try:
    fcntl.fcntl(fd, fcntl.F_GETFD)
    print("kept")
except OSError:
    print("closed")
os.waitpid(zombie, 0)
"""


@pytest.mark.kernel
def test_a_libbcc_that_closes_descriptors_it_never_opened_is_not_used_for_user_stacks(
    spawn: Spawn,
) -> None:
    """The cause, shown on this host's libbcc: if it closes a pidfd it never opened (bcc
    #5193), the sensor never hands it a process to symbolize."""
    child = spawn()
    out = subprocess.run(
        [sys.executable, "-c", _LIBBCC_CLOSES, str(child.pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert out in ("kept", "closed")
    if out == "closed":
        assert not kernel._user_symbols_safe(), "this libbcc closes our descriptors"


# -- identification: the pin is checked once the stack (native code) has been read ----------


def _pidfds() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "pidfd" in os.readlink(f"/proc/self/fd/{name}"):
                found.append(int(name))
    return sorted(found)


def test_a_pin_lost_while_the_stack_was_symbolized_drops_the_record(
    spawn: Spawn, tmp_path: Path
) -> None:
    """The agent's order: pin, then symbolize (where libbcc closed the number). The record is
    refused, and the stranger's pidfd that took the number is left open."""
    stranger = spawn()
    other = os.pidfd_open(stranger.pid)
    proc, mount = tmp_path / "proc", tmp_path / "cgroup"
    (mount / "a").mkdir(parents=True)
    (mount / "a" / "cgroup.procs").write_text("")
    (mount / "cgroup.controllers").write_text("pids\n")
    me = proc / str(os.getpid())  # this test process, pinned; /proc read from a fixture
    me.mkdir(parents=True)
    fields = ["S", "1", "1", "1", "0", "-1", "4194304", *map(str, range(10, 22)), "1", "1", "1"]
    (me / "stat").write_text(f"{os.getpid()} (victim) {' '.join(fields)}\n")
    (me / "status").write_text("Name:\tvictim\nUid:\t1000\t1000\t1000\t1000\n")
    (me / "cmdline").write_bytes(b"victim\0")
    (me / "cgroup").write_text("0::/a\n")
    before = set(_pidfds())
    taken: list[int] = []

    def stack_of(_record: SensorRecord) -> tuple[str, ...]:
        (pin,) = set(_pidfds()) - before  # the pidfd identification just opened
        os.dup2(other, pin, inheritable=False)  # closed and reused, as libbcc makes it
        taken.append(pin)
        return ()

    procfs = ProcFS(proc)
    ident = ProcIdentifier(procfs, CgroupV2Driver(mount, procfs), stack_of=stack_of)
    # Born at tick 1, as the fixture's stat says; crossing long after.
    birth = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    rec = replace(
        _record(os.getpid()), ts_boot_ns=2**62, cgroup_id=0, birth_ns=birth, key_birth_ns=birth
    )
    try:
        with pytest.raises(IdentityUnverified, match="behind its back"):
            ident.identify(rec)
        assert is_open(taken[0]), "the stranger's pidfd was closed with the lost pin"
    finally:
        for fd in (other, *taken):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert alive(stranger)


def test_an_offender_that_lost_its_pin_is_released_on_the_next_tick(spawn: Spawn) -> None:
    """Nothing can be done through a lost pin: the sweep releases it (a later record pins the
    process anew) instead of raising on it at every tick for ever."""
    offender, stranger = spawn(), spawn()
    identifier = Identifier(offender)
    engine = _engine(identifier, Killer(), Sink())
    other = os.pidfd_open(stranger.pid)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.close, other)
        cleanup.callback(engine.close)
        engine.on_record(replace(_record(offender.pid), degraded=True))
        number = identifier.handles[0].fileno()
        steal(identifier.handles[0], other)
        cleanup.callback(os.close, number)  # the stranger's pidfd now, not the engine's
        engine.tick()
        assert list(engine.offenders()) == []
    assert alive(stranger) and alive(offender)
