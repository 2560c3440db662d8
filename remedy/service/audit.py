"""Where decisions go: an append-only JSON-lines audit file and the console."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from remedy.engine.decisions import Decision, DecisionSink


class AuditLog:
    """One JSON object per line, flushed and fsynced per decision: after a crash the audit
    still says what was done. Created 0600 because it names processes and command lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, decision: Decision) -> None:
        line = json.dumps(decision.to_json(), sort_keys=True, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """Prints each decision's message as it happens."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out

    def record(self, decision: Decision) -> None:
        mode = "dry-run" if decision.dry_run else "enforce"
        print(
            f"[{decision.policy}] {mode}: {decision.message}",
            file=self._out,
            flush=True,
        )


class FanOut:
    """Sends each decision to several sinks."""

    def __init__(self, sinks: Iterable[DecisionSink]) -> None:
        self._sinks = tuple(sinks)

    def record(self, decision: Decision) -> None:
        for sink in self._sinks:
            sink.record(decision)
