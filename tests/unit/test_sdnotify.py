"""sd_notify: datagrams to $NOTIFY_SOCKET, abstract addresses, the watchdog interval."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from remedy.service.sdnotify import Notifier


def test_outside_systemd_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog_s is None


def test_ready_and_watchdog_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"})
        assert n.watchdog_s == 30.0
        assert n.ready("watching fork_rate")
        assert server.recv(1024) == b"READY=1\nSTATUS=watching fork_rate"
        assert n.watchdog()
        assert server.recv(1024) == b"WATCHDOG=1"


def test_abstract_socket_and_someone_elses_watchdog() -> None:
    name = f"remedy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
        assert n.watchdog_s is None  # the watchdog is for pid 1, not us
        assert n.stopping()
        assert server.recv(1024) == b"STOPPING=1"
