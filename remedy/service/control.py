"""The control socket: ``remedy status``, ``top``, ``silence`` and ``release`` talk to the agent.

A Unix stream socket, root only twice over: the socket is 0600 in a 0700 directory, and every
connection's peer credentials (SO_PEERCRED, unforgeable: the kernel fills them in at connect) are
checked against ``allowed_uids``. The protocol is one JSON object per line each way::

    → {"op": "status"}
    ← {"ok": true, "sensor": "kernel", ...}

Requests are ``{"op": OP, ...}`` with OP one of :data:`OPS`; responses always carry ``"ok"`` and,
when it is false, ``"error"``.

Threads: the server calls the handler on a connection thread, never on the agent's worker. The
engine belongs to the worker, so the agent wires it like this:

* ``status``: served from a :class:`StatusBoard` the worker publishes to once a second
  (:func:`status_from`), so a busy worker never makes ``remedy top`` hang.
* ``silence-add``, ``silence-list``, ``silence-expire``, ``release``: handed to the worker through
  a :class:`WorkerInbox` (``inbox.call(fn)`` here, ``inbox.drain()`` in the worker loop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from remedy.policy.model import Selector, Silence
from remedy.policy.schema import SilenceDoc
from remedy.status import (
    AgentSnapshot,
    ControlError,
    DecisionView,
    SilenceView,
    StatusPayload,
    encode_line,
)

if TYPE_CHECKING:
    from remedy.engine.decisions import Decision

__all__ = [
    "MAX_REQUEST",
    "OPS",
    "ControlServer",
    "Handler",
    "RecentDecisions",
    "StatusBoard",
    "WorkerInbox",
    "decision_view",
    "silence_from_request",
    "silence_view",
    "status_from",
]

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # one request line, newline included
# A client gets this long to deliver each whole request line (not per recv: one byte a second
# would keep a per-recv timeout waiting forever), and this long to read each answer.
CONNECTION_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16  # connection threads; see ControlServer for who gets a slot when full
OPS: frozenset[str] = frozenset(
    {"status", "silence-add", "silence-list", "silence-expire", "release"}
)

#: request → response; runs on a connection thread (see the module docstring).
Handler = Callable[[dict[str, Any]], dict[str, Any]]

# struct ucred from <sys/socket.h>: pid_t pid; uid_t uid; gid_t gid (socket(7), SO_PEERCRED).
_UCRED = struct.Struct("iII")


# -- the status payload ----------------------------------------------------------------------


def status_from(
    snapshot: AgentSnapshot,
    throttles: Sequence[Mapping[str, Any]],
    decisions: Sequence[Mapping[str, Any]],
    silences: Sequence[Mapping[str, Any]],
) -> StatusPayload:
    """The ``status`` response for ``snapshot``. ``decisions`` may be full audit dicts
    (``Decision.to_json()``) or :func:`decision_view` results; they are cut down to the view."""
    return {
        "ok": True,
        "sensor": snapshot.sensor,
        "counters": {n: dataclasses.asdict(c) for n, c in sorted(snapshot.counters.items())},
        "records_received": snapshot.records_received,
        "queue_full": snapshot.queue_full,
        "engine": dict(snapshot.engine),
        "offenders": [
            {"pid": o.pid, "comm": o.comm, "policy": o.policy, "state": o.state, "step": o.step}
            for o in snapshot.offenders
        ],
        "throttles": [
            {
                "id": str(t.get("id", "")),
                "action": str(t.get("action", "")),
                "policy": str(t.get("policy", "")),
                "pid": t.get("pid"),
                "cgroup": t.get("cgroup"),
                "expires": float(t.get("expires", 0.0)),
                "revert_failed": t.get("revert_failed"),
            }
            for t in throttles
        ],
        "decisions": [_decision_fields(d) for d in decisions],
        "silences": [_silence_fields(s) for s in silences],
        "cpu_s": round(snapshot.cpu_s, 3),
        "max_rss_mib": round(snapshot.max_rss_mib, 1),
        "rss_mib": round(snapshot.rss_mib, 1),
        "rss_anon_mib": round(snapshot.rss_anon_mib, 1),
    }


def _decision_fields(d: Mapping[str, Any]) -> DecisionView:
    ts = d.get("ts")
    if ts is None and "time" in d:
        ts = _iso(float(d["time"]))
    return {
        "ts": str(ts or ""),
        "policy": str(d.get("policy", "")),
        "outcome": str(d.get("outcome", "")),
        "action": d.get("action"),
        "pid": int(d.get("pid", 0)),
        "comm": str(d.get("comm", "")),
        "message": str(d.get("message", "")),
    }


def _silence_fields(s: Mapping[str, Any]) -> SilenceView:
    return {
        "name": str(s.get("name", "")),
        "author": str(s.get("author", "")),
        "reason": str(s.get("reason", "")),
        "expires": float(s.get("expires", 0.0)),
        "match": dict(s.get("match", {})),
        "policies": list(s.get("policies", [])),
    }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def decision_view(decision: Decision) -> DecisionView:
    """The few fields of a decision that ``status`` shows."""
    return {
        "ts": _iso(decision.time),
        "policy": decision.policy,
        "outcome": decision.outcome,
        "action": decision.action,
        "pid": decision.pid,
        "comm": decision.comm,
        "message": decision.message,
    }


def silence_view(silence: Silence) -> SilenceView:
    """A silence as ``status`` and ``silence list`` show it."""
    match = {
        f.name: list(getattr(silence.match, f.name))
        for f in dataclasses.fields(Selector)
        if getattr(silence.match, f.name)
    }
    return {
        "name": silence.name,
        "author": silence.author,
        "reason": silence.reason,
        "expires": silence.expires,
        "match": match,
        "policies": list(silence.policies),
    }


def silence_from_request(data: Mapping[str, Any], *, now: float | None = None) -> Silence:
    """The ``silence`` of a ``silence-add`` request, validated exactly like a ``kind: Silence``
    file (name, comm length, absolute exe, ISO expiry with a timezone). ControlError says what
    is wrong; an expiry in the past is refused (it would silence nothing)."""
    doc = {"apiVersion": "remedy/v1", "kind": "Silence", **data}
    try:
        spec = SilenceDoc.model_validate(doc)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'silence'}: {_problem(e)}" for e in err.errors()
        )
        raise ControlError(f"invalid silence: {problems}") from None
    if spec.expires <= (time.time() if now is None else now):
        raise ControlError(f"invalid silence: expires {_iso(spec.expires)} is in the past")
    m = spec.match
    return Silence(
        name=spec.name,
        file=Path("<control socket>"),
        match=Selector(
            cgroups=tuple(m.cgroups),
            comms=tuple(m.comms),
            exes=tuple(m.exes),
            cmdlines=tuple(m.cmdlines),
            uids=tuple(u for u in m.uids if isinstance(u, int)),  # names resolved by validation
            containers=tuple(m.containers),
            pods=tuple(m.pods),
        ),
        author=spec.author,
        reason=spec.reason,
        expires=spec.expires,
        policies=tuple(spec.policies),
    )


def _problem(error: Any) -> str:
    # Our validators raise ValueError with a finished sentence; pydantic prefixes "Value error".
    if error.get("type") == "value_error" and "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"])
    return str(error["msg"])


# -- helpers for the agent's side ------------------------------------------------------------


class StatusBoard:
    """The latest status, published by the worker once a second, read by connection threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: StatusPayload | None = None

    def publish(self, status: StatusPayload) -> None:
        with self._lock:
            self._status = status

    def latest(self) -> StatusPayload:
        """The last published status; ControlError while the agent has not published yet."""
        with self._lock:
            if self._status is None:
                raise ControlError("the agent is starting: no status yet, try again in a second")
            return self._status


class RecentDecisions:
    """A decision sink keeping the last ``size`` decisions as :class:`DecisionView`."""

    def __init__(self, size: int = 20) -> None:
        self._lock = threading.Lock()
        self._items: deque[DecisionView] = deque(maxlen=size)

    def record(self, decision: Decision) -> None:
        view = decision_view(decision)
        with self._lock:
            self._items.append(view)

    def items(self) -> list[DecisionView]:
        """Oldest first."""
        with self._lock:
            return list(self._items)


@dataclasses.dataclass
class _Call:
    fn: Callable[[], dict[str, Any]]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    # queued -> running -> done, or queued -> abandoned (never runs); changed under the lock.
    state: str = "queued"


class WorkerInbox:
    """Runs control requests on the worker thread, the only one that may touch the engine.

    A connection thread calls :meth:`call`, which waits (at most ``timeout_s``) until the worker
    takes the function in :meth:`drain`, between records. A call still queued when its caller
    gives up is abandoned and never runs, so "nothing was done" is then true: a timed-out
    ``release`` never happens behind the operator's back. A call the worker has already started
    cannot be taken back; its caller waits up to ``finish_s`` more for the final outcome and
    otherwise says that the change may have been made. Both bounds together stay under the
    client's default timeout (5 s), so the answer reaches ``remedy`` before it gives up."""

    def __init__(self, timeout_s: float = 3.0, finish_s: float = 1.5) -> None:
        self.timeout_s = timeout_s
        self.finish_s = finish_s
        self._lock = threading.Lock()
        self._calls: deque[_Call] = deque()

    def call(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        item = _Call(fn)
        with self._lock:
            self._calls.append(item)
        if not item.done.wait(self.timeout_s):
            with self._lock:
                if item.state == "queued":
                    item.state = "abandoned"
                    raise ControlError(
                        f"the agent's worker did not take the request within {self.timeout_s:g} s"
                        " (busy or stuck); nothing was done"
                    )
            # Running (or finished just now): its outcome is the truth, whatever it is.
            if not item.done.wait(self.finish_s):
                raise ControlError(
                    "the agent's worker started the request but did not finish it within "
                    f"{self.timeout_s + self.finish_s:g} s; it may have been carried out: check "
                    "`remedy status` (the audit log records what was done)"
                )
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def drain(self) -> int:
        """Run every pending call (worker thread only); returns how many ran."""
        ran = 0
        while True:
            with self._lock:
                if not self._calls:
                    return ran
                item = self._calls.popleft()
                if item.state == "abandoned":
                    continue
                item.state = "running"  # from here on its caller waits for the outcome
            try:
                item.result = item.fn()
            except Exception as err:  # reported to the caller, never kills the worker
                item.error = err
            ran += 1
            with self._lock:
                item.state = "done"
                item.done.set()


# -- the server ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Waiting:
    """A connection whose thread is reading a request line (see ControlServer)."""

    conn: socket.socket
    since: float  # time.monotonic() when the server started waiting for the line
    evicted: bool = False  # its slot went to a newer connection: it must not be answered


class ControlServer:
    """Serves ``handler`` on a Unix socket at ``path`` from a background thread.

    ``start()`` prepares the directory (created 0700; an existing one must already be private),
    removes a stale socket left by a dead agent (refusing if a live one answers), binds with mode
    0600 and starts accepting. Each connection is checked with SO_PEERCRED, then served one JSON
    request per line (at most :data:`MAX_REQUEST` bytes) until the client closes. Each request
    line must arrive whole within ``timeout_s`` of the server starting to wait for it, however
    the client spreads its bytes; then the connection is dropped. ``stop()`` closes and removes
    the socket file.

    When every slot is taken, a new connection takes the slot of the connection that has waited
    longest for its request line (it is told so and closed, and no request of it runs), so
    clients that trickle bytes cannot lock out one that sends its request at once. Only
    connections still waiting are ever dropped this way: a request being answered keeps its slot.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        allowed_uids: frozenset[int] = frozenset({0}),
        timeout_s: float = CONNECTION_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.handler = handler
        self.allowed_uids = allowed_uids
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, _Waiting] = {}  # connections reading a request line

    def start(self) -> None:
        if self._sock is not None:
            raise ControlError(f"control socket {self.path} already started")
        self._prepare_dir()
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            # The directory is private, so the moment between bind and chmod exposes nothing.
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CONNECTIONS)
            sock.settimeout(0.2)  # accept() wakes to notice stop()
        except OSError as err:
            sock.close()
            raise ControlError(f"cannot serve the control socket {self.path}: {err}") from err
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="remedy-control")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _prepare_dir(self) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
            return
        except FileExistsError:
            pass
        except OSError as err:
            raise ControlError(f"cannot create the control directory {directory}: {err}") from err
        st = directory.stat()
        # Never chmod a directory we did not create (think /tmp): require it to be private.
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise ControlError(
                f"control directory {directory} must be owned by uid {os.geteuid()} with mode "
                f"0700 (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
            )

    def _clear_stale(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError as err:
            if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError(f"cannot probe the control socket {self.path}: {err}") from err
            log.info("removing stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        finally:
            probe.close()
        raise ControlError(f"another agent is already listening on {self.path}")

    def _accept_loop(self) -> None:
        assert self._sock is not None
        listener = self._sock
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if self._stopping.is_set():
                    return
                log.warning("control socket accept failed: %s", err)
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False) and not self._take_a_slot():
                self._refuse(conn, "busy: too many control connections")
                continue
            threading.Thread(
                target=self._serve_then_release, args=(conn,), name="remedy-control-conn"
            ).start()

    def _take_a_slot(self) -> bool:
        """Every slot is taken: drop the connection that has waited longest for its request
        line and take its slot. False when every slot is answering a request."""
        with self._lock:
            if not self._waiting:
                return False
            victim = min(self._waiting.values(), key=lambda w: w.since)
            victim.evicted = True
            del self._waiting[victim.conn]
            # Wakes its recv() with end of file; its thread tells it why and frees the slot.
            with contextlib.suppress(OSError):
                victim.conn.shutdown(socket.SHUT_RD)
        return self._slots.acquire(timeout=1.0)

    def _refuse(self, conn: socket.socket, error: str) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(encode_line({"ok": False, "error": error}))

    def _serve_then_release(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except OSError as err:  # the client went away mid-answer
            log.debug("control connection ended: %s", err)
        except Exception:  # a connection must never take the agent down
            log.exception("control connection failed")
        finally:
            conn.close()
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout_s)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, _gid = _UCRED.unpack(creds)
        if uid not in self.allowed_uids:
            log.warning("control socket: refused pid %d uid %d", pid, uid)
            conn.sendall(encode_line({"ok": False, "error": "permission denied"}))
            return
        buffer = b""
        while not self._stopping.is_set():
            line, buffer, error = self._read_request(conn, buffer)
            if line is None:
                if error is not None:
                    with contextlib.suppress(OSError):
                        conn.settimeout(1.0)
                        conn.sendall(encode_line({"ok": False, "error": error}))
                return
            if line.strip():
                conn.settimeout(self.timeout_s)  # sendall: the whole answer within timeout_s
                conn.sendall(encode_line(self._answer(line)))

    def _read_request(
        self, conn: socket.socket, buffer: bytes
    ) -> tuple[bytes | None, bytes, str | None]:
        """The next request line, the bytes after it, and None; or None, the rest, and why
        the connection ends (None when the client simply closed)."""
        waiting = _Waiting(conn, time.monotonic())
        deadline = waiting.since + self.timeout_s
        with self._lock:
            self._waiting[conn] = waiting
        try:
            while True:
                newline = buffer.find(b"\n")
                if newline >= 0:
                    with self._lock:
                        if waiting.evicted:  # lost its slot at this very moment: never answer
                            return None, b"", None
                        self._waiting.pop(conn, None)
                    return buffer[:newline], buffer[newline + 1 :], None
                if len(buffer) >= MAX_REQUEST:
                    return None, b"", f"request larger than {MAX_REQUEST} bytes"
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, b"", f"no complete request line within {self.timeout_s:g} s"
                conn.settimeout(left)
                try:
                    chunk = conn.recv(MAX_REQUEST - len(buffer))
                except TimeoutError:
                    continue  # the deadline check above says why
                if waiting.evicted:
                    return (
                        None,
                        b"",
                        (
                            "dropped: every control connection was taken and this one had waited "
                            "longest for its request"
                        ),
                    )
                if not chunk or self._stopping.is_set():
                    return None, b"", None
                buffer += chunk
        finally:
            with self._lock:
                self._waiting.pop(conn, None)

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return {"ok": False, "error": f"request is not JSON: {err}"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": 'request must be a JSON object with an "op"'}
        if req["op"] not in OPS:
            return {"ok": False, "error": f"unknown op {req['op']!r}; known: {sorted(OPS)}"}
        try:
            response = self.handler(req)
        except Exception as err:
            log.info("control op %s failed: %s", req["op"], err)
            return {"ok": False, "error": str(err) or type(err).__name__}
        if not isinstance(response, dict):
            return {"ok": False, "error": f"handler returned {type(response).__name__}"}
        response.setdefault("ok", True)
        try:
            json.dumps(response)
        except (TypeError, ValueError) as err:
            return {"ok": False, "error": f"response not serializable: {err}"}
        return response
