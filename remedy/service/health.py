"""Is the agent alive, and is it ready? The worker's heartbeat, its contained faults, and the
supervision that turns a dead or stuck worker into a loud non-zero exit.

The agent is crash-only: a fault while deciding one record is contained to that record (counted
here, logged, audited by the agent), and a worker that cannot go on ends the process, so systemd
or Kubernetes restart it and the undo journal settles what the dead instance left applied. A
live process that enforces nothing is the one outcome never allowed.

``Health`` is written by the worker (heartbeat, faults) and the agent (what started), and read
by the main thread's supervision and by the metrics server's ``/healthz`` and ``/readyz``. It
is neutral: the agent and the metrics server both import it, neither imports the other for it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TextIO, runtime_checkable

from remedy.errors import RemedyError

__all__ = [
    "EXIT_WORKER_FAILED",
    "Health",
    "HealthWatcher",
    "Verdict",
    "WorkerDied",
    "audit_problem",
    "supervise",
]

log = logging.getLogger(__name__)

EXIT_WORKER_FAILED = 2
"""The exit status of an agent whose worker died or got stuck (a remedy error, like the rest)."""

STALL_S = 30.0
"""No heartbeat for this long while records wait: the worker is stuck. Longer than any one step
may legitimately take (``terminate`` waits out a 10 s grace period on the worker today)."""
IDLE_STALL_S = 120.0
"""No heartbeat for this long with nothing queued: stuck too. TTLs and control requests are
served by the worker, so a wedged idle worker is not harmless, only less urgent."""
FAULT_LOG_EVERY_S = 60.0
"""A fault that repeats (one failing every tick) logs its traceback once, then a count at most
this often; the metric counts every one."""


class WorkerDied(RemedyError):
    """The worker thread ended while the agent was meant to be running."""


@dataclass(frozen=True)
class Verdict:
    """An answer for a probe: ``ok`` (HTTP 200) or not (503), with a one-line reason."""

    ok: bool
    text: str


@runtime_checkable
class HealthWatcher(Protocol):
    """An observer that also serves the agent's health (the metrics server's probes)."""

    def watch_health(self, health: Health) -> None: ...


@dataclass
class _Repeat:
    count: int = 0
    logged_at: float | None = None


class Health:
    """The agent's liveness and readiness. Thread-safe where it must be: the heartbeat is one
    float written by the worker (an atomic store in CPython), faults are counted under a lock.

    ``clock`` is monotonic seconds, injected so staleness is tested without sleeping."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        stall_s: float = STALL_S,
        idle_stall_s: float = IDLE_STALL_S,
    ) -> None:
        self._clock = clock
        self.stall_s = stall_s
        self.idle_stall_s = idle_stall_s
        self._lock = threading.Lock()
        self._beat = clock()
        self._doing = "starting"
        self._worker: threading.Thread | None = None
        self._waiting: Callable[[], int] = lambda: 0
        self._death: BaseException | None = None
        self._stopping = False
        self._sensor: str | None = None
        self._sensor_alive: Callable[[], bool] = lambda: False
        self._policies = 0
        self._audit: Path | None = None
        self._faults: Counter[tuple[str, str]] = Counter()
        self._repeats: dict[tuple[str, str], _Repeat] = {}

    # -- written by the worker ----------------------------------------------------------------

    def beat(self, doing: str = "waiting for records") -> None:
        """The worker is alive and about to do ``doing`` (named in a stuck report)."""
        self._beat = self._clock()
        self._doing = doing

    def fault(self, site: str, err: BaseException) -> None:
        """Count a contained failure at ``site`` (record, tick, reload, observe) and log it:
        the first of its kind with its traceback, repeats as a count now and then."""
        key = (site, type(err).__name__)
        now = self._clock()
        with self._lock:
            self._faults[key] += 1
            repeat = self._repeats.setdefault(key, _Repeat())
            first = repeat.logged_at is None
            repeat.count += 1
            due = repeat.logged_at is None or now - repeat.logged_at >= FAULT_LOG_EVERY_S
            if due:
                count, repeat.count, repeat.logged_at = repeat.count, 0, now
        if not due:
            return
        if first:
            log.error(
                "worker: %s failed (%s: %s); contained, the worker goes on",
                site,
                type(err).__name__,
                err,
                exc_info=(type(err), err, err.__traceback__),
            )
        else:
            log.error(
                "worker: %s failed %d more time(s) with %s in the last %g s; last: %s",
                site,
                count,
                type(err).__name__,
                FAULT_LOG_EVERY_S,
                err,
            )

    def faults(self) -> dict[tuple[str, str], int]:
        """Contained failures so far, by (site, exception class)."""
        with self._lock:
            return dict(self._faults)

    # -- written by the agent -----------------------------------------------------------------

    def worker_started(self, worker: threading.Thread, waiting: Callable[[], int]) -> None:
        """``waiting``: how many records are queued for the worker."""
        self._waiting = waiting
        self._beat = self._clock()
        self._worker = worker

    def worker_died(self, err: BaseException) -> None:
        self._death = err

    def sensor_up(self, kind: str, alive: Callable[[], bool]) -> None:
        """The sensor is attached (kernel) or sampling; ``alive``: its reader is still polling."""
        self._sensor, self._sensor_alive = kind, alive

    def policies_loaded(self, count: int) -> None:
        self._policies = count

    def audit_at(self, path: Path | None) -> None:
        self._audit = path

    def stopping(self) -> None:
        self._stopping = True

    # -- verdicts -----------------------------------------------------------------------------

    @property
    def worker(self) -> threading.Thread | None:
        return self._worker

    @property
    def death(self) -> BaseException | None:
        """What ended the worker, when an exception did."""
        return self._death

    def heartbeat_age(self) -> float:
        return max(0.0, self._clock() - self._beat)

    def problem(self) -> str | None:
        """Why the worker is dead or stuck, or None. Before it starts: nothing to judge."""
        worker = self._worker
        if worker is None:
            return None
        if not worker.is_alive():
            if self._stopping:
                return None
            death = self._death
            why = f": {type(death).__name__}: {death}" if death is not None else ""
            return f"the worker thread died{why}"
        age, waiting = self.heartbeat_age(), self._waiting()
        if (waiting and age >= self.stall_s) or age >= self.idle_stall_s:
            return (
                f"the worker is stuck: no heartbeat for {age:.0f} s while {self._doing}, "
                f"{waiting} record(s) waiting"
            )
        return None

    def liveness(self) -> Verdict:
        """/healthz: the worker runs and its heartbeat is fresh."""
        if self._worker is None:
            return Verdict(False, "starting: the worker is not running yet")
        if self._stopping:
            return Verdict(False, "stopping")
        problem = self.problem()
        if problem is not None:
            return Verdict(False, problem)
        return Verdict(True, f"ok: worker heartbeat {self.heartbeat_age():.1f} s ago")

    def readiness(self) -> Verdict:
        """/readyz: alive, the sensor attached (or the sampler running), policies loaded and
        the audit log writable."""
        alive = self.liveness()
        if not alive.ok:
            return alive
        if self._sensor is None or not self._sensor_alive():
            return Verdict(False, "not ready: the sensor is not attached")
        if self._policies < 1:
            return Verdict(False, "not ready: no policies loaded")
        if self._audit is not None:
            problem = audit_problem(self._audit)
            if problem is not None:
                return Verdict(False, f"not ready: {problem}")
        return Verdict(True, f"ready: {self._sensor} sensor, {self._policies} policy(ies)")


def audit_problem(path: Path) -> str | None:
    """Why the audit log at ``path`` cannot take another line, or None: the file (or, before
    its first line, its directory) is not writable, or its filesystem has no space left."""
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):  # EROFS and modes; root passes plain permission bits
        return f"audit log {path} is not writable"
    try:
        fs = os.statvfs(target)
    except OSError as err:
        return f"audit log {path}: {err.strerror}"
    if fs.f_bavail * fs.f_frsize < 64 * 1024 or (fs.f_files and fs.f_favail == 0):
        return f"audit log {path}: no space left on its filesystem"
    return None


def supervise(
    health: Health,
    stop: threading.Event,
    *,
    duration_s: float | None = None,
    poll_s: float = 0.5,
    abort: Callable[[int], NoReturn] = os._exit,
    err: TextIO | None = None,
) -> None:
    """The main thread's wait: returns when ``stop`` is set or ``duration_s`` has passed.

    A worker that died raises :class:`WorkerDied`: the caller unwinds normally (the engine is
    nobody's now, so shutdown may revert through it). A worker that is stuck still owns the
    engine and may be inside a write, so nothing may touch it: the stuck frame is printed and
    the process ends at once through ``abort`` (``os._exit``), as a crash would; the undo
    journal is built for exactly that, and the next start (or ``remedy reconcile``) settles it.
    """
    out = err if err is not None else sys.stderr
    deadline = None if duration_s is None else time.monotonic() + duration_s
    while True:
        left = poll_s if deadline is None else min(poll_s, max(0.0, deadline - time.monotonic()))
        if stop.wait(left):
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        problem = health.problem()
        if problem is None:
            continue
        print(f"remedy: FATAL: {problem}; exiting so the agent is restarted", file=out, flush=True)
        worker = health.worker
        if worker is not None and not worker.is_alive():
            raise WorkerDied(problem) from health.death
        _print_stack(worker, out)
        abort(EXIT_WORKER_FAILED)


def _print_stack(worker: threading.Thread | None, out: TextIO) -> None:
    frame = sys._current_frames().get(worker.ident or -1) if worker is not None else None
    if frame is not None:
        print("the worker is stuck here:", file=out)
        print("".join(traceback.format_stack(frame)), file=out, flush=True)
