"""remedy top: one frame rendered from a fake status, and the real command in a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from remedy.service.control import ControlServer
from remedy.tools.top import Rates, format_status, render_top

STATUS: dict[str, Any] = {
    "ok": True,
    "sensor": "kernel",
    "counters": {
        "fork_rate": {
            "events_seen": 123456,
            "records_emitted": 42,
            "ringbuf_failed": 0,
            "windows_opened": 10,
            "key_init_failed": 0,
        }
    },
    "records_received": 42,
    "queue_full": 0,
    "engine": {},
    "offenders": [
        {"pid": 4242, "comm": "forkbomb", "policy": "fork-bomb", "state": "throttled", "step": 1}
    ],
    "throttles": [
        {
            "id": "u1",
            "action": "cpu_quota",
            "policy": "fork-bomb",
            "pid": 4242,
            "cgroup": None,
            "expires": 4102444800.0,
        }
    ],
    "decisions": [
        {
            "ts": "2025-01-01T00:00:01.000+00:00",
            "policy": "fork-bomb",
            "outcome": "acted",
            "action": "cpu_quota",
            "pid": 4242,
            "comm": "forkbomb",
            "message": "quota 10%",
        }
    ],
    "silences": [],
    "cpu_s": 1.0,
    "max_rss_mib": 50.0,
}


def test_one_frame_shows_counters_rates_and_offenders() -> None:
    rates = Rates()
    rates.update(STATUS, 10.0)
    later = {
        **STATUS,
        "counters": {
            "fork_rate": {**STATUS["counters"]["fork_rate"], "events_seen": 123456 + 2000}
        },
    }
    console = Console(record=True, width=120)
    console.print(render_top(later, rates.update(later, 12.0)))
    text = console.export_text()
    assert "fork_rate" in text
    assert "125,456" in text
    assert "1,000/s" in text  # 2000 events in 2 s
    assert "4242" in text and "forkbomb" in text and "throttled" in text
    assert "quota 10%" in text


def test_status_text() -> None:
    text = format_status(STATUS)
    assert "pid 4242 forkbomb: policy fork-bomb, throttled, step 1" in text
    assert "u1: cpu_quota on pid 4242" in text


@pytest.fixture
def fake_agent() -> Iterator[Path]:
    path = Path(f"/tmp/remedy-top-{os.getpid()}") / "control.sock"
    with ControlServer(path, lambda _req: dict(STATUS), allowed_uids=frozenset({os.geteuid()})):
        yield path
    path.parent.rmdir()


def test_top_once_in_a_pty(fake_agent: Path) -> None:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "remedy", "top", "--once", "--socket", str(fake_agent)],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
        close_fds=True,
    )
    os.close(secondary)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([primary], [], [], 20)
            if not ready:
                break
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
    text = out.decode(errors="replace")
    assert "fork_rate" in text
    assert "forkbomb" in text
