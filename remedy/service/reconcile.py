"""``remedy reconcile``: take back what has expired while no agent runs.

A TTL must not depend on a running agent with a valid policy set that passed its self-test: a
bad policy edit stops the agent (``ExecStartPre`` runs ``remedy check``), and a 4 h freeze would
stay. This needs only the undo journal and the cgroup and /proc roots: no policies, no BPF, no
self-test. It takes the journal's lock, so it never touches records a running agent owns; the
unit runs it when the agent stops or fails (``ExecStopPost``) and a timer runs it while the agent
is down (deploy/systemd), a sidecar does the same in Kubernetes (docs/undo.md).
"""

from __future__ import annotations

import io
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from remedy.actions.base import ActionContext
from remedy.actions.boot import Boot
from remedy.actions.cgroups import detect
from remedy.actions.journal import Journal, JournalBusy
from remedy.actions.registry import ACTIONS
from remedy.actions.undoer import Undoer
from remedy.clock import Clock, SystemClock
from remedy.proc import ProcFS

__all__ = ["EXIT_BUSY", "EXIT_STUCK", "ReconcileOptions", "main", "reconcile_once"]

EXIT_BUSY = 75
"""The journal is locked by a running agent: nothing was touched (sysexits' EX_TEMPFAIL)."""
EXIT_STUCK = 2
"""Some revert failed (or is backing off after failing): it stays in the journal, retried later."""


@dataclass(frozen=True)
class ReconcileOptions:
    """What one reconcile needs: the journal and the roots the reverts write under."""

    journal: Path
    revert_all: bool = False
    cgroup_root: Path = Path("/sys/fs/cgroup")
    proc_root: Path = Path("/proc")
    quarantine_root: str = "/remedy"


def reconcile_once(
    opts: ReconcileOptions, out: TextIO, *, clock: Clock | None = None, boot: Boot | None = None
) -> int:
    """One pass: lock the journal, close what another boot left, revert what has expired (all
    with ``revert_all``), release it. Exit 0, :data:`EXIT_BUSY` or :data:`EXIT_STUCK`."""
    if not opts.journal.exists():
        # Opening would create it (and its directory): nothing was ever applied here.
        print(f"reconcile: no journal at {opts.journal}, nothing to do", file=out, flush=True)
        return 0
    clock = clock or SystemClock()
    try:
        # Never wait: a running agent owns the records, and an agent starting gets them at once.
        journal = Journal(opts.journal, clock, boot=boot, lock_wait_s=0)
    except JournalBusy as err:
        print(f"reconcile: {err}: an agent owns it, nothing done", file=out, flush=True)
        return EXIT_BUSY
    try:
        procfs = ProcFS(opts.proc_root)
        ctx = ActionContext(detect(opts.cgroup_root, procfs), procfs, opts.quarantine_root)
        undoer = Undoer(journal, ctx, clock, ACTIONS)
        for detail in undoer.reconcile(keep_unexpired=not opts.revert_all):
            print(f"reconcile: {detail}", file=out, flush=True)
        stuck = undoer.stuck()
        for record, why in stuck:
            print(
                f"reconcile: still applied: {record.action} on {record.cgroup} (undo "
                f"{record.id[:8]}, {why.attempts} failed attempt(s)): {why.error}",
                file=out,
                flush=True,
            )
        left = len(journal.active())
    finally:
        journal.close()
    print(f"reconcile: {left} record(s) still active", file=out, flush=True)
    return EXIT_STUCK if stuck else 0


def main(opts: ReconcileOptions, out: TextIO, *, every_s: float | None = None) -> int:
    """One pass, or with ``every_s`` one pass every that many seconds until SIGTERM/SIGINT
    (the Kubernetes sidecar): the lock is released between passes, so an agent that starts
    takes the journal over, and the passes while it runs touch nothing."""
    if every_s is None:
        return reconcile_once(opts, out)
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()  # finish the pass under way: a revert is never cut half way by us

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code, said = 0, ""
    while not stop.is_set():
        buffer = io.StringIO()
        code = reconcile_once(opts, buffer)
        # A pass like the last one (the agent still holds the lock, nothing active) is not news.
        if buffer.getvalue() != said:
            said = buffer.getvalue()
            out.write(said)
            out.flush()
        stop.wait(every_s)
    return 0 if code == EXIT_BUSY else code
