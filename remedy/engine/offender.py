"""The per-offender state machine (see docs/states.md).

An offender is one process (pid + start time, so a reused pid is a different offender) under one
policy, or, for a cgroup signal, one cgroup (its inode, so a cgroup removed and created again
under the same name is a different offender) under one policy. Its machine is built with
``transitions``; the engine drives it, and a transition that is not allowed from the current
state raises, so an impossible sequence is a bug caught in tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from transitions import Machine

from remedy.proc import ProcessInfo
from remedy.sensors.context import Context
from remedy.sensors.records import SensorRecord

STATES = ("observed", "suspect", "offending", "remediating", "cooldown", "released")

# trigger, source(s), destination
TRANSITIONS: tuple[dict[str, Any], ...] = (
    # A record crossed for this process: the engine checks its guards.
    {"trigger": "suspect", "source": "observed", "dest": "suspect"},
    # Every guard passed: the policy says act.
    {"trigger": "confirm", "source": "suspect", "dest": "offending"},
    {"trigger": "act", "source": "offending", "dest": "remediating"},
    {"trigger": "acted", "source": "remediating", "dest": "cooldown"},
    # No action was taken (protected, silenced, degraded, precedence, breaker, rate limit, or the
    # action failed): back to watching; the escalation level is kept.
    {"trigger": "hold", "source": ["suspect", "offending", "remediating"], "dest": "observed"},
    {"trigger": "cooled", "source": "cooldown", "dest": "observed"},
    {"trigger": "release", "source": ["observed", "cooldown"], "dest": "released"},
)


class Handle(Protocol):
    """A pinned process (a pidfd in production, a fake in tests)."""

    def has_exited(self) -> bool: ...

    def send_signal(self, sig: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Member:
    """A process in a cgroup offender's subtree when it was identified, for protection."""

    pid: int
    exe: str | None = None  # None when unreadable (gone, a kernel thread)
    is_kernel_thread: bool = False
    start_ticks: int = 0  # with uid: what the protector checks the rest of its identity by
    uid: int = -1


@dataclass
class Subject:
    """Who the offender is, read once when its first record arrives.

    A cgroup offender (pid 0 and ``cgroup_inode`` set; records of cgroup-keyed signals) is no
    process:
    ``pid`` is 0 and ``start_ticks`` is the cgroup's inode, so every table keyed by
    :attr:`key` (offenders, the undo journal, quarantine names, breakers) tells one cgroup from
    another and from any process; ``handle`` pins the cgroup (its inode), not a process, and
    every step acts with scope cgroup. The process whose event crossed is context only.
    """

    pid: int
    start_ticks: int
    comm: str
    ppid: int
    exe: str | None
    uid: int
    is_kernel_thread: bool
    cgroup: str  # relative to the hierarchy root, "/a/b"
    cgroup_display: str  # absolute path for humans
    handle: Handle | None = None
    parents: tuple[tuple[int, str], ...] = ()  # (pid, comm), nearest first
    context: Context | None = None  # container, exe, cmdline, parent chain: for humans
    stack: tuple[str, ...] = ()  # symbolized frames at the crossing, when captured
    birth_ns: int = 0  # task->start_boottime as the kernel recorded it; 0 when unknown
    # ``cgroup``'s directory inode at identification (0: unknown); the reach gate refuses a
    # cgroup whose inode has changed since. For a cgroup offender it is also its identity.
    cgroup_inode: int = 0
    members: tuple[Member, ...] = ()  # a cgroup offender: its subtree when identified

    @classmethod
    def pinned(
        cls,
        info: ProcessInfo,
        handle: Handle,
        cgroup: str,
        cgroup_display: str,
        *,
        cgroup_inode: int = 0,
        birth_ns: int = 0,
    ) -> Subject:
        """A process offender from what was read through its pidfd (``info``, ``handle``)."""
        return cls(
            pid=info.pid,
            start_ticks=info.start_ticks,
            comm=info.comm,
            ppid=info.ppid,
            exe=info.exe,
            uid=info.uid,
            is_kernel_thread=info.is_kernel_thread,
            cgroup=cgroup,
            cgroup_display=cgroup_display,
            handle=handle,
            birth_ns=birth_ns,
            cgroup_inode=cgroup_inode,
        )

    @property
    def key(self) -> tuple[int, int]:
        """(pid, start ticks); (0, inode) for a cgroup offender."""
        return (self.pid, self.start_ticks)

    @property
    def is_cgroup(self) -> bool:
        """A cgroup offender, not a process (pid 0 is never a process remedy can act on)."""
        return self.pid == 0 and self.cgroup_inode != 0


@dataclass(eq=False)  # identity: the machine and the engine's tables tell offenders apart by it
class Offender:
    """One process under one policy. ``state`` is managed by the machine."""

    subject: Subject
    policy: str
    first_seen: float
    last_seen: float
    step: int = 0  # the next playbook step to run: escalation is kept until release
    cooldown_until: float = 0.0
    records: int = 0
    judge_at: float | None = None  # when the last step's `until` is re-measured
    until_below: int | None = None
    last_record: SensorRecord | None = None
    # A step was run for real (or tried: a failed apply may have changed something half way):
    # the undo journal may hold its change, so the engine never evicts this offender; only a
    # release (which reverts) ends it.
    applied: bool = False
    # The record whose incident the sensor holds for this offender (one record per incident:
    # the sensor stops re-emitting it), and when the engine next re-measures it instead.
    held: SensorRecord | None = None
    measure_at: float = 0.0
    state: str = field(default="observed", init=False)


class _Models:
    """The machine's models by identity: ``transitions`` keeps them in a list and tests
    membership on every ``add_model`` and ``remove_model`` (O(n), with dataclass ``==``), which
    made each new offender cost more than the last (issue 11: 14 ms per record at 8k). This
    offers the list operations transitions 0.9 uses, in O(1)."""

    def __init__(self) -> None:
        self._by_id: dict[int, Any] = {}  # id() is stable: the dict holds the model alive

    def __contains__(self, model: object) -> bool:
        return id(model) in self._by_id

    def append(self, model: Any) -> None:
        self._by_id[id(model)] = model

    def remove(self, model: Any) -> None:
        del self._by_id[id(model)]

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._by_id.values()))  # a copy: callers may add or remove meanwhile

    def __getitem__(self, index: int) -> Any:
        return list(self._by_id.values())[index]  # only Machine.model (one model) indexes


def new_machine() -> Machine:
    """One machine shared by all offenders (transitions supports many models per machine),
    with models held by identity so attaching and detaching stay O(1)."""
    machine = Machine(
        model=None,
        states=list(STATES),
        transitions=list(TRANSITIONS),
        initial="observed",
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )
    machine.models = _Models()  # type: ignore[assignment]  # duck-typed: the ops it uses
    return machine


def attach(machine: Machine, offender: Offender) -> Offender:
    """Give ``offender`` its state and triggers."""
    machine.add_model(offender, initial="observed")
    return offender


def fire(offender: Offender, trigger: str) -> None:
    """Run a transition; raises transitions.MachineError when it is not allowed from here."""
    getattr(offender, "trigger")(trigger)  # noqa: B009 - added at run time by transitions


def detach(machine: Machine, offender: Offender) -> None:
    """Take ``offender`` off the machine (it keeps its state; it fires no more)."""
    machine.remove_model(offender)
    # transitions binds every trigger and state test to the model as a partial holding the
    # model: a cycle only the cyclic GC frees, so each offender released or evicted lingered
    # until a full collection, whose cost grows with the heap (issue 11's bench: memory and
    # cost per record rising with evictions). Unbound, the offender is freed when dropped.
    for name, value in list(vars(offender).items()):
        if isinstance(value, partial):
            delattr(offender, name)
