"""The control socket: a real server on a temporary path with a fake handler."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remedy.service.control import (
    MAX_CONNECTIONS,
    MAX_REQUEST,
    ControlServer,
    WorkerInbox,
    silence_from_request,
)
from remedy.status import ControlError, request


def _echo(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("boom"):
        raise ValueError("handler exploded")
    return {"ok": True, "echo": req}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    # sun_path holds 108 bytes: keep the path short whatever pytest's tmp dir is.
    short = Path(f"/tmp/remedy-test-{os.getpid()}-{tmp_path.name[-20:]}")
    return short / "control.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, _echo, allowed_uids=frozenset({os.geteuid()}))
    srv.start()
    yield srv
    srv.stop()
    sock_path.parent.rmdir()


def test_round_trip(server: ControlServer) -> None:
    response = request(server.path, {"op": "status", "x": 1})
    assert response == {"ok": True, "echo": {"op": "status", "x": 1}}


def test_several_requests_on_one_connection(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.path))
        s.sendall(b'{"op": "status"}\n{"op": "silence-list"}\n')
        data = b""
        while data.count(b"\n") < 2:
            data += s.recv(4096)
    ops = [json.loads(line)["echo"]["op"] for line in data.splitlines()]
    assert ops == ["status", "silence-list"]


def test_socket_is_0600_in_a_0700_directory(server: ControlServer) -> None:
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(server.path.stat().st_mode)


def test_stop_removes_the_socket(sock_path: Path) -> None:
    srv = ControlServer(sock_path, _echo, allowed_uids=frozenset({os.geteuid()}))
    srv.start()
    srv.stop()
    assert not sock_path.exists()
    sock_path.parent.rmdir()


def test_peer_credentials_refused(sock_path: Path) -> None:
    with ControlServer(sock_path, _echo, allowed_uids=frozenset({12345})):
        assert request(sock_path, {"op": "status"}) == {"ok": False, "error": "permission denied"}
    sock_path.parent.rmdir()


def test_stale_socket_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock_path))  # bound, never listening: what a killed agent leaves behind
    dead.close()
    with ControlServer(sock_path, _echo, allowed_uids=frozenset({os.geteuid()})):
        assert request(sock_path, {"op": "status"})["ok"]
    sock_path.parent.rmdir()


def test_a_live_server_is_not_replaced(server: ControlServer) -> None:
    second = ControlServer(server.path, _echo)
    with pytest.raises(ControlError, match="already listening"):
        second.start()
    assert request(server.path, {"op": "status"})["ok"]


def test_a_regular_file_is_not_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir(mode=0o700)
    sock_path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(sock_path, _echo).start()
    sock_path.unlink()
    sock_path.parent.rmdir()


def test_a_shared_directory_is_refused(tmp_path: Path) -> None:
    shared = Path(f"/tmp/remedy-shared-{os.getpid()}")
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o777)
    try:
        with pytest.raises(ControlError, match="mode 0700"):
            ControlServer(shared / "c.sock", _echo).start()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # never chmods what it did not make
    finally:
        shared.rmdir()


def test_oversized_request(server: ControlServer) -> None:
    big = {"op": "status", "pad": "x" * MAX_REQUEST}
    response = request(server.path, big)
    assert response["ok"] is False
    assert "larger than" in response["error"]
    assert request(server.path, {"op": "status"})["ok"]  # the server lives on


def test_handler_error_is_an_answer(server: ControlServer) -> None:
    assert request(server.path, {"op": "status", "boom": True}) == {
        "ok": False,
        "error": "handler exploded",
    }


def test_bad_requests(server: ControlServer) -> None:
    assert "unknown op" in request(server.path, {"op": "reboot"})["error"]
    assert '"op"' in request(server.path, {"nop": 1})["error"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.path))
        s.sendall(b"{not json\n")
        assert "not JSON" in json.loads(s.recv(4096))["error"]


def test_client_error_when_nobody_listens(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no agent listening on"):
        request(tmp_path / "nothing.sock", {"op": "status"})


def test_worker_inbox_runs_on_drain_and_skips_abandoned_calls() -> None:
    inbox = WorkerInbox(timeout_s=5.0)
    results: list[dict[str, Any]] = []
    caller = threading.Thread(target=lambda: results.append(inbox.call(lambda: {"ok": True})))
    caller.start()
    while inbox.drain() == 0:
        pass
    caller.join()
    assert results == [{"ok": True}]

    ran: list[int] = []

    def release() -> dict[str, Any]:
        ran.append(1)
        return {"ok": True}

    impatient = WorkerInbox(timeout_s=0.01)
    with pytest.raises(ControlError, match="nothing was done"):
        impatient.call(release)
    assert impatient.drain() == 0
    assert ran == []


def test_silence_from_request_validates_like_a_file() -> None:
    silence = silence_from_request(
        {
            "name": "deploy",
            "author": "ana",
            "reason": "rollout",
            "expires": "2999-01-01T00:00:00Z",
            "match": {"comms": ["make"]},
        }
    )
    assert silence.match.comms == ("make",)
    assert silence.policies == ()
    with pytest.raises(ControlError, match="exes"):
        silence_from_request(
            {
                "name": "x",
                "author": "a",
                "reason": "r",
                "expires": "2999-01-01T00:00:00Z",
                "match": {"exes": ["make"]},
            }
        )
    with pytest.raises(ControlError, match="in the past"):
        silence_from_request(
            {
                "name": "x",
                "author": "a",
                "reason": "r",
                "expires": "2000-01-01T00:00:00Z",
                "match": {},
            }
        )


# --- deadlines (issue 11, item 7) ---------------------------------------------------------------


def _trickle(path: Path, stop: threading.Event, every_s: float, closed: list[float]) -> None:
    """A client sending one byte of a request every ``every_s`` until the server hangs up or
    ``stop`` is set; appends the time it was cut off to ``closed``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.settimeout(every_s)
        payload = b'{"op": "status", "pad": "' + b"x" * 1000
        for byte in payload:
            if stop.is_set():
                return
            try:
                s.sendall(bytes([byte]))
                if s.recv(4096) == b"":
                    break
            except TimeoutError:
                continue  # the server said nothing: it is still waiting for the line
            except OSError:
                break
            else:
                break  # the server answered (an error line): it is done with us
        closed.append(time.monotonic())


@pytest.fixture
def quick_server(sock_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, _echo, allowed_uids=frozenset({os.geteuid()}), timeout_s=1.0)
    srv.start()
    yield srv
    srv.stop()
    sock_path.parent.rmdir()


def _start_tricklers(
    path: Path, count: int, stop: threading.Event, closed: list[float]
) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=_trickle, args=(path, stop, 0.25, closed)) for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads


def test_a_request_has_one_deadline_however_slowly_its_bytes_arrive(
    quick_server: ControlServer,
) -> None:
    # Four bytes a second would reset a per-recv timeout of 1 s forever.
    stop, closed = threading.Event(), list[float]()
    start = time.monotonic()
    (thread,) = _start_tricklers(quick_server.path, 1, stop, closed)
    thread.join(timeout=6.0)
    stop.set()
    thread.join()
    assert closed, "the slow client was never cut off"
    assert closed[0] - start < 3.0


def test_slow_clients_do_not_lock_out_a_fast_one(quick_server: ControlServer) -> None:
    stop, closed = threading.Event(), list[float]()
    tricklers = _start_tricklers(quick_server.path, MAX_CONNECTIONS, stop, closed)
    try:
        time.sleep(0.5)  # every slot is now held by a client that has sent a few bytes
        for _ in range(3):  # the fast client's request is served, at once, every time
            start = time.monotonic()
            assert request(quick_server.path, {"op": "status"}, timeout_s=2.0)["ok"] is True
            assert time.monotonic() - start < 0.9  # not waiting out the slow ones (1 s)
    finally:
        stop.set()
        for thread in tricklers:
            thread.join()


def test_a_dropped_slow_client_is_told_why_and_never_answered(quick_server: ControlServer) -> None:
    seen: list[dict[str, Any]] = []

    def recording(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        return {"ok": True}

    quick_server.handler = recording
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(quick_server.path))
    slow.sendall(b'{"op": "release", "pid": 1')  # no newline yet
    time.sleep(0.1)  # slow is now the connection waiting longest
    holders = [socket.socket(socket.AF_UNIX) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        for holder in holders:
            holder.connect(str(quick_server.path))
        time.sleep(0.2)
        assert request(quick_server.path, {"op": "status"})["ok"] is True  # took slow's slot
        slow.settimeout(2.0)
        answer = slow.recv(4096)
        assert b"waited longest" in answer
        with contextlib.suppress(OSError):
            slow.sendall(b"}\n")  # too late: that request must never run
        time.sleep(0.2)
        assert [r["op"] for r in seen] == ["status"]
    finally:
        slow.close()
        for holder in holders:
            holder.close()


# --- a timed-out call says whether it ran -------------------------------------------------------


def _worker(inbox: WorkerInbox, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            inbox.drain()
            time.sleep(0.005)

    thread = threading.Thread(target=loop)
    thread.start()
    return thread


def test_a_call_the_worker_started_reports_its_outcome_not_nothing_done() -> None:
    inbox = WorkerInbox(timeout_s=0.1, finish_s=2.0)
    made: list[int] = []

    def slow_release() -> dict[str, Any]:
        time.sleep(0.4)  # the caller's 0.1 s to take the call pass while this runs
        made.append(1)
        return {"ok": True, "reverted": 1}

    stop = threading.Event()
    worker = _worker(inbox, stop)
    try:
        assert inbox.call(slow_release) == {"ok": True, "reverted": 1}
    finally:
        stop.set()
        worker.join()
    assert made == [1]


def test_a_call_still_running_after_the_grace_may_have_run() -> None:
    inbox = WorkerInbox(timeout_s=0.05, finish_s=0.1)
    release = threading.Event()

    def stuck() -> dict[str, Any]:
        release.wait(5.0)
        return {"ok": True}

    stop = threading.Event()
    worker = _worker(inbox, stop)
    try:
        with pytest.raises(ControlError) as info:
            inbox.call(stuck)
        assert "may have been carried out" in str(info.value)
        assert "nothing was done" not in str(info.value)
    finally:
        release.set()
        stop.set()
        worker.join()


def test_a_late_failure_is_the_answer() -> None:
    inbox = WorkerInbox(timeout_s=0.05, finish_s=2.0)

    def fails() -> dict[str, Any]:
        time.sleep(0.2)
        raise ControlError("no offender with pid 7")

    stop = threading.Event()
    worker = _worker(inbox, stop)
    try:
        with pytest.raises(ControlError, match="no offender with pid 7"):
            inbox.call(fails)
    finally:
        stop.set()
        worker.join()


def test_the_inbox_answers_before_the_client_gives_up() -> None:
    inbox = WorkerInbox()
    assert inbox.timeout_s + inbox.finish_s < 5.0  # request()'s default timeout
