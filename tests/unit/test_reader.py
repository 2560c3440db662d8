"""The ring-buffer reader: batches into a bounded queue, never blocks, counts what it drops."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from remedy.sensors.reader import RingBufferReader
from remedy.sensors.records import SensorRecord


def _record(tgid: int) -> SensorRecord:
    return SensorRecord("fork_rate", tgid, tgid, 1, "x", 1, 200, 1.0, 0.1, 0)


class FakeRing:
    """Delivers a fixed batch on the first poll, then nothing."""

    def __init__(self, batch: list[SensorRecord], fail: bool = False) -> None:
        self.batch = batch
        self.fail = fail
        self.callback: Callable[[SensorRecord], None] | None = None
        self.polled = threading.Event()

    def open_ring_buffer(self, callback: Callable[[SensorRecord], None]) -> None:
        self.callback = callback

    def poll(self, timeout_ms: int) -> None:
        if self.fail:
            raise OSError("ring buffer gone")
        assert self.callback is not None
        for record in self.batch:
            self.callback(record)
        self.batch = []
        self.polled.set()


def test_full_queue_drops_and_counts_instead_of_blocking() -> None:
    ring = FakeRing([_record(i) for i in range(10)])
    out: queue.Queue[SensorRecord] = queue.Queue(maxsize=4)
    reader = RingBufferReader(ring, out, poll_ms=1)
    reader.start()
    assert ring.polled.wait(5)
    reader.stop()
    assert reader.received == 10
    assert reader.queue_full == 6
    assert out.qsize() == 4
    assert not reader.alive


def test_poll_failure_is_kept_for_the_agent() -> None:
    reader = RingBufferReader(FakeRing([], fail=True), queue.Queue(), poll_ms=1)
    reader.start()
    reader.stop()
    assert isinstance(reader.error, OSError)
