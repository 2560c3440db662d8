"""Process actions: notify, renice, ionice, stop, continue, terminate.

Targets follow the step's scope: the offender (through the pidfd opened when it was identified),
plus ``ctx.pinned_reach``: its descendants (tree) or every other member of its cgroup (cgroup),
each pinned by a pidfd first and judged through the pinned process. Operations that only take a
number (setpriority, ioprio_set on each thread) check the pidfd right before the call.

renice and ionice are per *thread* on Linux (setpriority(2) and ioprio_set(2) with a pid act on
that one thread), so they walk /proc/pid/task. Python's os has no ioprio call: ioprio_set and
ioprio_get go through libc's syscall(2) by number (x86_64 251/252, aarch64 30/31).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from remedy.actions.base import ActionContext
from remedy.actions.params import (
    ActionParams,
    IoniceParams,
    NotifyParams,
    ReniceParams,
    TerminateParams,
)
from remedy.actions.process import Birth, ProcessHandle
from remedy.actions.throttle import new_record
from remedy.actions.timers import Escalation, Held, close_all, hold
from remedy.actions.undo import UndoRecord
from remedy.engine.offender import Handle, Subject
from remedy.errors import ActionError, PermissionDenied, ProcessGone

__all__ = [
    "Continue",
    "Ionice",
    "Notify",
    "Renice",
    "Stop",
    "Terminate",
    "ioprio_get",
    "ioprio_set",
]

# include/uapi/linux/ioprio.h
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASS = {"best-effort": 2, "idle": 3}
_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}


def _syscall(index: int, *args: int) -> int:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise ActionError(f"ioprio syscalls unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    result: int = libc.syscall(numbers[index], *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def ioprio_set(tid: int, value: int) -> None:
    """ioprio_set(IOPRIO_WHO_PROCESS, tid, value); raises OSError."""
    _syscall(0, _IOPRIO_WHO_PROCESS, tid, value)


def ioprio_get(tid: int) -> int:
    """ioprio_get(IOPRIO_WHO_PROCESS, tid); raises OSError."""
    return _syscall(1, _IOPRIO_WHO_PROCESS, tid)


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class _Target:
    """A process an action reaches, pinned: its pid, start time (identity) and pidfd."""

    pid: int
    start_ticks: int
    handle: Handle


@contextlib.contextmanager
def _targets(subject: Subject, ctx: ActionContext) -> Iterator[list[_Target]]:
    """The offender and everything its scope reaches, each pinned."""
    if subject.handle is None:
        raise ActionError(
            "no pidfd for the offender; refusing to act on a bare pid", pid=subject.pid
        )
    with ctx.pinned_reach(subject, _now_ns()) as reached:
        # A cgroup offender is no process (pid 0): only its members are reached.
        own = (
            [] if subject.is_cgroup else [_Target(subject.pid, subject.start_ticks, subject.handle)]
        )
        yield [*own, *(_Target(h.pid, h.start_ticks, h) for h in reached)]


def _threads(pid: int, ctx: ActionContext) -> list[int]:
    try:
        return [int(t) for t in os.listdir(ctx.procfs.root / str(pid) / "task")]
    except FileNotFoundError as err:
        raise ProcessGone("exited", pid=pid) from err
    except OSError as err:
        raise ActionError(f"cannot list threads: {err.strerror}", pid=pid) from err


# include/uapi/linux/pidfd.h: a pidfd for one thread (Linux 6.9); it polls readable when that
# thread exits, and while it is open and the thread has not exited its tid cannot be reused.
_PIDFD_THREAD = os.O_EXCL


@contextlib.contextmanager
def _pinned_thread(tid: int) -> Iterator[int | None]:
    """A pidfd for thread ``tid``, or None on kernels without PIDFD_THREAD (EINVAL)."""
    try:
        fd = os.pidfd_open(tid, _PIDFD_THREAD)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _thread_alive(fd: int | None) -> bool:
    if fd is None:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)


def _per_thread(target: _Target, ctx: ActionContext, what: str, op: Callable[[int], None]) -> None:
    """``op(tid)`` on every thread of the pinned ``target``. Each thread is pinned too and
    checked right before the call: alive, and still a thread of this process (its
    /proc/PID/task entry, read while the process is pinned and alive)."""
    pid = target.pid
    for tid in _threads(pid, ctx):
        try:
            with _pinned_thread(tid) as fd:
                task_dir = ctx.procfs.root / str(pid) / "task" / str(tid)
                if target.handle.has_exited():
                    raise ProcessGone(f"exited before {what}", pid=pid)
                if not _thread_alive(fd) or not task_dir.exists():
                    continue  # that thread exited; its tid may be someone else's now
                op(tid)
        except ProcessLookupError:
            continue  # that thread exited
        except OSError as err:
            if err.errno in (errno.EPERM, errno.EACCES):
                raise PermissionDenied(f"{what}: {err.strerror}", pid=pid) from err
            raise ActionError(f"{what}: {err.strerror}", pid=pid) from err


def _scope_words(ctx: ActionContext) -> str:
    return {"tree": " and its descendants", "cgroup": " and every process of its cgroup"}.get(
        ctx.scope, ""
    )


class Notify:
    """Changes nothing: the engine audits and alerts with the message."""

    name = "notify"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, NotifyParams)
        return f"notify: {params.message}" if params.message else "notify"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, NotifyParams)
        return params.message


class _PerProcess:
    """A reversible per-process setting: previous values keyed "<pid>" -> "<start_ticks> <v>".
    Revert pins each pid again and goes on only if the pinned process has that start time
    (psutil's identity, at clock-tick resolution): never a reused pid."""

    name: str

    def _get(self, target: _Target) -> str:
        raise NotImplementedError

    def _set(self, target: _Target, value: str, ctx: ActionContext) -> None:
        raise NotImplementedError

    def undo(
        self,
        params: ActionParams,
        subject: Subject,
        ctx: ActionContext,
        *,
        policy: str,
        ttl_s: float,
        now_wall: float,
    ) -> UndoRecord:
        previous: dict[str, str] = {}
        with _targets(subject, ctx) as targets:
            for target in targets:
                try:
                    if target.handle.has_exited():
                        continue
                    previous[str(target.pid)] = f"{target.start_ticks} {self._get(target)}"
                except (ActionError, OSError):
                    continue
        return new_record(
            self.name,
            subject,
            subject.cgroup,
            policy=policy,
            ttl_s=ttl_s,
            now_wall=now_wall,
            previous=previous,
            pids=tuple(int(p) for p in previous),
        )

    def revert(self, record: UndoRecord, ctx: ActionContext) -> str:
        done = 0
        hz = ctx.procfs.clock_ticks()
        for key, entry in record.previous.items():
            ticks, value = entry.split(" ", 1)
            pid = int(key)
            birth = Birth(int(ticks) * 1_000_000_000 // hz, exact=False)
            try:
                # ProcessGone also when the pid now names another process.
                with ProcessHandle.bind(pid, ctx.procfs, birth=birth) as handle:
                    self._set(_Target(pid, handle.start_ticks, handle), value, ctx)
                done += 1
            except ProcessGone:
                continue
        return f"restored {self.name} on {done} process(es)"


class Renice(_PerProcess):
    """setpriority(2) on every thread of each target."""

    name = "renice"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, ReniceParams)
        return f"nice {params.nice} on the offender{_scope_words(ctx)}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, ReniceParams)
        done = 0
        with _targets(subject, ctx) as targets:
            for target in targets:
                with contextlib.suppress(ProcessGone):
                    self._set(target, str(params.nice), ctx)
                    done += 1
        return f"nice {params.nice} on {done} process(es)"

    def _get(self, target: _Target) -> str:
        return str(os.getpriority(os.PRIO_PROCESS, _checked(target, "getpriority")))

    def _set(self, target: _Target, value: str, ctx: ActionContext) -> None:
        nice = int(value)
        _per_thread(
            target, ctx, "setpriority", lambda tid: os.setpriority(os.PRIO_PROCESS, tid, nice)
        )


class Ionice(_PerProcess):
    """ioprio_set(2) on every thread of each target (idle, or best-effort at a level)."""

    name = "ionice"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, IoniceParams)
        return f"io class {params.io_class}/{params.level} on the offender{_scope_words(ctx)}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, IoniceParams)
        level = 0 if params.io_class == "idle" else params.level  # idle has no levels
        value = (_IOPRIO_CLASS[params.io_class] << _IOPRIO_CLASS_SHIFT) | level
        done = 0
        with _targets(subject, ctx) as targets:
            for target in targets:
                with contextlib.suppress(ProcessGone):
                    self._set(target, str(value), ctx)
                    done += 1
        return f"io class {params.io_class}/{level} on {done} process(es)"

    def _get(self, target: _Target) -> str:
        return str(ioprio_get(_checked(target, "ioprio_get")))

    def _set(self, target: _Target, value: str, ctx: ActionContext) -> None:
        raw = int(value)
        _per_thread(target, ctx, "ioprio_set", lambda tid: ioprio_set(tid, raw))


def _checked(target: _Target, what: str) -> int:
    """The pid, right after checking through the pidfd that its process has not exited."""
    if target.handle.has_exited():
        raise ProcessGone(f"exited before {what}", pid=target.pid)
    return target.pid


def _signal_all(sig: int, subject: Subject, ctx: ActionContext) -> list[_Target]:
    sent = []
    with _targets(subject, ctx) as targets:
        for target in targets:
            try:
                target.handle.send_signal(sig)
            except ProcessGone:
                continue
            sent.append(target)
    return sent


class Stop(_PerProcess):
    """SIGSTOP through pidfds; revert sends SIGCONT to the same processes."""

    name = "stop"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"SIGSTOP the offender{_scope_words(ctx)}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"stopped {len(_signal_all(signal.SIGSTOP, subject, ctx))} process(es)"

    def _get(self, target: _Target) -> str:
        return "stopped"

    def _set(self, target: _Target, value: str, ctx: ActionContext) -> None:
        target.handle.send_signal(signal.SIGCONT)


class Continue:
    """SIGCONT through pidfds (itself the undo of stop: not reversible)."""

    name = "continue"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"SIGCONT the offender{_scope_words(ctx)}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"continued {len(_signal_all(signal.SIGCONT, subject, ctx))} process(es)"


class Terminate:
    """SIGTERM (and SIGCONT) to each target, then SIGKILL to those still alive after
    ``grace_s``. The executor calls :meth:`start`, which returns at once with an
    :class:`Escalation` the worker's tick settles (remedy/actions/timers.py); :meth:`run` waits
    the grace out and is for callers that are not the worker (tests, tools)."""

    name = "terminate"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, TerminateParams)
        return f"SIGTERM the offender{_scope_words(ctx)}, SIGKILL after {params.grace_s:g} s"

    def start(
        self, params: ActionParams, subject: Subject, ctx: ActionContext, now: float
    ) -> tuple[str, Escalation]:
        """SIGTERM every target and return the escalation due at ``now + grace_s`` (monotonic
        seconds). Each target's pidfd is duplicated *before* the signal, so the SIGKILL goes
        through the same pidfd whatever the engine closes meanwhile; when that cannot be done
        (EMFILE) nothing is signalled."""
        assert isinstance(params, TerminateParams)
        if subject.handle is None:
            raise ActionError(
                "no pidfd for the offender; refusing to signal a bare pid", pid=subject.pid
            )
        held: list[Held] = []
        try:
            with _targets(subject, ctx) as targets:
                for target in targets:
                    held.append(hold(target.pid, target.handle))
            termed = [t for t in held if _term(t.handle)]
        except BaseException:
            close_all(held)
            raise
        close_all([t for t in held if t not in termed])  # gone before SIGTERM: nothing to hold
        escalation = Escalation(termed, due=now + params.grace_s, grace_s=params.grace_s)
        return (
            f"SIGTERM to {len(termed)} process(es); SIGKILL to those still running when "
            "the grace ends",
            escalation,
        )

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        """:meth:`start`, then wait out the grace on this thread (never the worker's)."""
        assert isinstance(params, TerminateParams)
        _, escalation = self.start(params, subject, ctx, time.monotonic())
        while (settled := escalation.poll(time.monotonic())) is None:
            time.sleep(min(0.01, max(0.0, escalation.due - time.monotonic())))
        return (
            f"SIGTERM to {escalation.count} process(es), "
            f"SIGKILL to {settled.killed} after the grace"
        )


def _term(handle: Handle) -> bool:
    """SIGTERM through ``handle``; False when the process was already gone."""
    try:
        handle.send_signal(signal.SIGTERM)
        # A stopped process (an earlier `stop` step) cannot act on SIGTERM until it runs
        # again: let it, so the grace period means something.
        handle.send_signal(signal.SIGCONT)
    except ProcessGone:
        return False
    return True
