"""The control socket: a real server on a temporary path with a fake handler."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remedy.service.control import (
    MAX_REQUEST,
    ControlError,
    ControlServer,
    WorkerInbox,
    request,
    silence_from_request,
)


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
    import threading  # noqa: PLC0415

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
