"""What the agent and its operator tools share: the status types and the control socket's client.

The daemon (:mod:`remedy.service`) publishes snapshots and serves the control socket; the tools
(:mod:`remedy.tools`) render and request. Neither side imports the other: this module is the
contract, and it imports neither (nor bcc).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from remedy.errors import RemedyError
from remedy.sensors.catalog import SignalCounters

__all__ = [
    "DEFAULT_SOCKET",
    "AgentSnapshot",
    "ControlError",
    "DecisionView",
    "OffenderRow",
    "OffenderView",
    "SilenceView",
    "StatusPayload",
    "ThrottleView",
    "encode_line",
    "request",
]

DEFAULT_SOCKET = Path("/run/remedy/control.sock")


class ControlError(RemedyError):
    """The control socket could not be served or reached, or the agent refused a request."""


# -- the status payload ----------------------------------------------------------------------


class OffenderRow(TypedDict):
    pid: int
    comm: str
    policy: str
    state: str
    step: int


class ThrottleView(TypedDict):
    """A reversible change in force (an undo journal entry not yet reverted)."""

    id: str
    action: str
    policy: str
    pid: int | None
    cgroup: str | None
    expires: float  # wall-clock epoch seconds: reverted at the latest then
    # {"attempts": n, "error": "..."} once a revert failed (still applied, being retried)
    revert_failed: dict[str, Any] | None


class DecisionView(TypedDict):
    ts: str
    policy: str
    outcome: str
    action: str | None
    pid: int
    comm: str
    message: str


class SilenceView(TypedDict):
    name: str
    author: str
    reason: str
    expires: float
    match: dict[str, list[Any]]  # non-empty selector fields only
    policies: list[str]


class StatusPayload(TypedDict):
    """What ``status`` answers; ``remedy top`` and ``remedy status`` render it."""

    ok: bool
    sensor: str
    counters: dict[str, dict[str, int]]  # signal → SignalCounters fields
    records_received: int
    queue_full: int
    engine: dict[str, int]
    offenders: list[OffenderRow]
    throttles: list[ThrottleView]
    decisions: list[DecisionView]  # oldest first
    silences: list[SilenceView]
    cpu_s: float
    max_rss_mib: float  # the peak: the compile at start
    rss_mib: NotRequired[float]  # resident now, and its anonymous part (docs/memory.md)
    rss_anon_mib: NotRequired[float]


@dataclass(frozen=True)
class OffenderView:
    """An offender as status and metrics show it."""

    pid: int
    comm: str
    policy: str
    state: str
    step: int


@dataclass(frozen=True)
class AgentSnapshot:
    """What the agent looks like right now, handed to observers once a second from the worker
    thread (metrics, the control socket). Plain data: observers never touch live objects."""

    sensor: str
    counters: dict[str, SignalCounters]
    records_received: int
    queue_full: int
    engine: dict[str, int]
    offenders: tuple[OffenderView, ...]
    cpu_s: float
    max_rss_mib: float
    throttles: int = 0  # reversible changes in force
    reverts_failing: int = 0  # of those, how many a revert failed for (retried with backoff)
    reloads: int = 0
    reloads_failed: int = 0
    rss_mib: float = 0.0  # resident now (max_rss_mib is the peak: the compile at start)
    rss_anon_mib: float = 0.0  # of it anonymous (docs/memory.md)


def encode_line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# -- the client ------------------------------------------------------------------------------

MAX_RESPONSE = 16 * 1024 * 1024


def request(path: Path, payload: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one request to the agent at ``path`` and return its response (``ok`` may be false:
    the caller decides). ControlError when no agent listens, access is denied, or the agent does
    not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"no agent listening on {path} (is `remedy run` running? --socket to point "
                "elsewhere)"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: the control socket is for root only"
            ) from None
        except OSError as err:
            raise ControlError(f"cannot reach the agent on {path}: {err}") from err
        try:
            # The agent may answer and hang up before reading (permission denied, busy): that
            # answer is still ours to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode_line(payload))
            data = b""
            while not data.endswith(b"\n"):
                # One deadline for the whole answer, as on the server side.
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_RESPONSE:
                    raise ControlError(f"the agent on {path} sent more than {MAX_RESPONSE} bytes")
        except TimeoutError:
            raise ControlError(
                f"the agent on {path} did not answer within {timeout_s:g} s; a request that "
                "changes something may still have been carried out: check `remedy status`"
            ) from None
        except OSError as err:
            raise ControlError(f"lost the agent on {path}: {err}") from err
    finally:
        sock.close()
    if not data:
        raise ControlError(f"the agent on {path} closed the connection without answering")
    try:
        response = json.loads(data)
    except json.JSONDecodeError as err:
        raise ControlError(f"the agent on {path} answered with invalid JSON: {err}") from err
    if not isinstance(response, dict):
        raise ControlError(f"the agent on {path} answered with {type(response).__name__}")
    return response
