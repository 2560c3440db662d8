"""The reader thread: polls the ring buffer in batches into a bounded queue.

The reader must never block on a slow consumer: a full queue drops the record and counts it, so
the kernel side keeps draining and the loss is visible in stats and metrics.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Protocol

from remedy.sensors.records import SensorRecord


class RingSource(Protocol):
    """What the reader needs of a sensor."""

    def open_ring_buffer(self, callback: Callable[[SensorRecord], None]) -> None: ...

    def poll(self, timeout_ms: int) -> None: ...


class RingBufferReader:
    """Runs ``source.poll`` on its own thread and puts records into ``out`` without blocking."""

    def __init__(
        self, source: RingSource, out: queue.Queue[SensorRecord], poll_ms: int = 100
    ) -> None:
        self._source = source
        self._out = out
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0
        self.queue_full = 0
        self.error: BaseException | None = None

    def _on_record(self, record: SensorRecord) -> None:
        self.received += 1
        try:
            self._out.put_nowait(record)
        except queue.Full:
            self.queue_full += 1

    def start(self) -> None:
        self._source.open_ring_buffer(self._on_record)
        self._thread = threading.Thread(target=self._run, name="remedy-ringbuf", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._source.poll(self._poll_ms)
        except BaseException as err:  # surfaced by the agent, which stops loudly
            self.error = err

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
