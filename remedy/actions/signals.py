"""Process actions: notify, renice, ionice, stop, continue, terminate.

Targets follow the step's scope: the offender (through the pidfd opened when it was identified),
plus ``ctx.reach``: its descendants (tree) or every other member of its cgroup (cgroup), each
pinned by a pidfd bound now and checked against its start time.

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
import signal
import time
from collections.abc import Callable, Iterator

from remedy.actions.base import ActionContext
from remedy.actions.params import (
    ActionParams,
    IoniceParams,
    NotifyParams,
    ReniceParams,
    TerminateParams,
)
from remedy.actions.process import ProcessHandle, pinned
from remedy.actions.throttle import new_record
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


@contextlib.contextmanager
def _targets(subject: Subject, ctx: ActionContext) -> Iterator[list[tuple[int, Handle]]]:
    """(pid, pinned handle) for the offender and everything its scope reaches."""
    if subject.handle is None:
        raise ActionError(
            "no pidfd for the offender; refusing to act on a bare pid", pid=subject.pid
        )
    now_ns = _now_ns()
    with pinned(ctx.reach(subject, now_ns), ctx.procfs, started_before_ns=now_ns) as reached:
        yield [(subject.pid, subject.handle), *((h.pid, h) for h in reached)]


def _threads(pid: int, ctx: ActionContext) -> list[int]:
    try:
        return [int(t) for t in os.listdir(ctx.procfs.root / str(pid) / "task")]
    except FileNotFoundError as err:
        raise ProcessGone("exited", pid=pid) from err
    except OSError as err:
        raise ActionError(f"cannot list threads: {err.strerror}", pid=pid) from err


def _per_thread(pid: int, ctx: ActionContext, what: str, op: Callable[[int], None]) -> None:
    for tid in _threads(pid, ctx):
        try:
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
    """A reversible per-process setting: previous values keyed "<pid>" -> "<start_ticks> <v>",
    so revert touches only processes that still have the start time they had (psutil's
    identity), never a reused pid."""

    name: str

    def _get(self, pid: int) -> str:
        raise NotImplementedError

    def _set(self, pid: int, value: str, ctx: ActionContext) -> None:
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
            for pid, _handle in targets:
                try:
                    ticks = ctx.procfs.read(pid).start_ticks
                    previous[str(pid)] = f"{ticks} {self._get(pid)}"
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
        for key, entry in record.previous.items():
            ticks, value = entry.split(" ", 1)
            pid = int(key)
            try:
                if ctx.procfs.read(pid).start_ticks != int(ticks):
                    continue  # the pid now names another process
                self._set(pid, value, ctx)
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
            for pid, handle in targets:
                if handle.has_exited():
                    continue
                with contextlib.suppress(ProcessGone):
                    self._set(pid, str(params.nice), ctx)
                    done += 1
        return f"nice {params.nice} on {done} process(es)"

    def _get(self, pid: int) -> str:
        return str(os.getpriority(os.PRIO_PROCESS, pid))

    def _set(self, pid: int, value: str, ctx: ActionContext) -> None:
        nice = int(value)
        _per_thread(pid, ctx, "setpriority", lambda tid: os.setpriority(os.PRIO_PROCESS, tid, nice))


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
            for pid, handle in targets:
                if handle.has_exited():
                    continue
                with contextlib.suppress(ProcessGone):
                    self._set(pid, str(value), ctx)
                    done += 1
        return f"io class {params.io_class}/{level} on {done} process(es)"

    def _get(self, pid: int) -> str:
        return str(ioprio_get(pid))

    def _set(self, pid: int, value: str, ctx: ActionContext) -> None:
        raw = int(value)
        _per_thread(pid, ctx, "ioprio_set", lambda tid: ioprio_set(tid, raw))


def _signal_all(sig: int, subject: Subject, ctx: ActionContext) -> list[tuple[int, Handle]]:
    sent = []
    with _targets(subject, ctx) as targets:
        for pid, handle in targets:
            try:
                handle.send_signal(sig)
            except ProcessGone:
                continue
            sent.append((pid, handle))
    return sent


class Stop(_PerProcess):
    """SIGSTOP through pidfds; revert sends SIGCONT to the same processes."""

    name = "stop"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"SIGSTOP the offender{_scope_words(ctx)}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"stopped {len(_signal_all(signal.SIGSTOP, subject, ctx))} process(es)"

    def _get(self, pid: int) -> str:
        return "stopped"

    def _set(self, pid: int, value: str, ctx: ActionContext) -> None:
        with ProcessHandle.bind(pid, ctx.procfs) as handle:
            handle.send_signal(signal.SIGCONT)


class Continue:
    """SIGCONT through pidfds (itself the undo of stop: not reversible)."""

    name = "continue"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"SIGCONT the offender{_scope_words(ctx)}"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        return f"continued {len(_signal_all(signal.SIGCONT, subject, ctx))} process(es)"


def _wait_exit(handle: Handle, timeout_s: float) -> bool:
    if isinstance(handle, ProcessHandle):
        return handle.wait_exit(timeout_s)
    deadline = time.monotonic() + timeout_s
    while not handle.has_exited():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class Terminate:
    """SIGTERM, up to ``grace_s`` for each target to exit, then SIGKILL to those still alive."""

    name = "terminate"

    def describe(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, TerminateParams)
        return f"SIGTERM the offender{_scope_words(ctx)}, SIGKILL after {params.grace_s:g} s"

    def run(self, params: ActionParams, subject: Subject, ctx: ActionContext) -> str:
        assert isinstance(params, TerminateParams)
        if subject.handle is None:
            raise ActionError(
                "no pidfd for the offender; refusing to signal a bare pid", pid=subject.pid
            )
        with _targets(subject, ctx) as targets:
            termed = []
            for pid, handle in targets:
                with contextlib.suppress(ProcessGone):
                    handle.send_signal(signal.SIGTERM)
                    # A stopped process (an earlier `stop` step) cannot act on SIGTERM until
                    # it runs again: let it, so the grace period means something.
                    handle.send_signal(signal.SIGCONT)
                    termed.append((pid, handle))
            deadline = time.monotonic() + params.grace_s
            killed = 0
            for _pid, handle in termed:
                if _wait_exit(handle, max(0.0, deadline - time.monotonic())):
                    continue
                with contextlib.suppress(ProcessGone):
                    handle.send_signal(signal.SIGKILL)
                    killed += 1
        return f"SIGTERM to {len(termed)} process(es), SIGKILL to {killed} after the grace"
