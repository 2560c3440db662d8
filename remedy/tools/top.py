"""What the operator sees through the control socket: ``remedy status``, ``remedy top`` (a live
rich view), ``remedy silence`` and ``remedy release``. Client side only: nothing here imports
the agent, so these commands work on a host without bcc."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from remedy.policy.durations import parse_duration
from remedy.status import DEFAULT_SOCKET, ControlError, request

__all__ = [
    "DEFAULT_SOCKET",
    "Rates",
    "add_parsers",
    "expiry",
    "format_status",
    "main",
    "render_top",
]

_RATE_FIELDS = ("events_seen", "records_emitted")


class Rates:
    """Per-second rates of the funnel counters, computed between two polls."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, int]] | None = None
        self._last_t = 0.0

    def update(self, status: Mapping[str, Any], now: float) -> dict[str, dict[str, float]]:
        """Rates since the previous update (empty on the first, or after a counter reset)."""
        counters: dict[str, dict[str, int]] = status.get("counters", {})
        rates: dict[str, dict[str, float]] = {}
        if self._last is not None and now > self._last_t:
            dt = now - self._last_t
            for name, c in counters.items():
                before = self._last.get(name)
                if before is None:
                    continue
                rates[name] = {
                    f: (c.get(f, 0) - before.get(f, 0)) / dt
                    for f in _RATE_FIELDS
                    if c.get(f, 0) >= before.get(f, 0)  # an agent restart resets counters
                }
        self._last, self._last_t = {n: dict(c) for n, c in counters.items()}, now
        return rates


def _rate(rates: Mapping[str, Mapping[str, float]], signal: str, field: str) -> str:
    value = rates.get(signal, {}).get(field)
    return "-" if value is None else f"{value:,.0f}/s"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def render_top(
    status: Mapping[str, Any], rates: Mapping[str, Mapping[str, float]] | None = None
) -> RenderableType:
    """One frame of ``remedy top``: the funnel per signal, offenders, recent decisions."""
    rates = rates or {}
    funnel = Table(title="funnel (kernel → user space)", expand=True)
    for col in ("signal", "events", "events/s", "records", "records/s", "ringbuf lost"):
        funnel.add_column(col, justify="left" if col == "signal" else "right")
    for name, c in sorted(status.get("counters", {}).items()):
        lost = c.get("ringbuf_failed", 0) + c.get("key_init_failed", 0)
        funnel.add_row(
            name,
            f"{c.get('events_seen', 0):,}",
            _rate(rates, name, "events_seen"),
            f"{c.get('records_emitted', 0):,}",
            _rate(rates, name, "records_emitted"),
            Text(f"{lost:,}", style="bold red" if lost else ""),
        )

    offenders = Table(title="offenders", expand=True)
    for col in ("pid", "comm", "policy", "state", "step"):
        offenders.add_column(col, justify="right" if col in ("pid", "step") else "left")
    for o in status.get("offenders", []):
        offenders.add_row(str(o["pid"]), o["comm"], o["policy"], o["state"], str(o["step"]))

    throttles = status.get("throttles", [])
    decisions = Table(title="last decisions", expand=True)
    for col in ("time", "policy", "outcome", "action", "pid", "comm", "message"):
        decisions.add_column(col, overflow="ellipsis", no_wrap=col != "message")
    for d in status.get("decisions", [])[-10:]:
        decisions.add_row(
            d["ts"][11:19] if len(d["ts"]) >= 19 else d["ts"],
            d["policy"],
            d["outcome"],
            d["action"] or "-",
            str(d["pid"]),
            d["comm"],
            d["message"],
        )
    header = Text(
        f"remedy top: sensor {status.get('sensor', '?')}, "
        f"{status.get('records_received', 0):,} records received, "
        f"{status.get('queue_full', 0):,} dropped (queue full), "
        f"{len(throttles)} throttle(s), {len(status.get('silences', []))} silence(s)"
    )
    return Group(header, funnel, offenders, decisions)


def format_status(status: Mapping[str, Any]) -> str:
    """``remedy status`` as plain text."""
    out = [
        f"sensor: {status.get('sensor', '?')}; {status.get('records_received', 0):,} records "
        f"received, {status.get('queue_full', 0):,} dropped (queue full)"
    ]
    out.append("counters:")
    for name, c in sorted(status.get("counters", {}).items()):
        fields = ", ".join(f"{k} {v:,}" for k, v in c.items())
        out.append(f"  {name}: {fields}")
    offenders = status.get("offenders", [])
    out.append(f"offenders ({len(offenders)}):")
    out += [
        f"  pid {o['pid']} {o['comm']}: policy {o['policy']}, {o['state']}, step {o['step']}"
        for o in offenders
    ]
    throttles = status.get("throttles", [])
    out.append(f"throttles ({len(throttles)}):")
    for t in throttles:
        target = f"pid {t['pid']}" if t.get("pid") is not None else f"cgroup {t.get('cgroup')}"
        out.append(
            f"  {t['id']}: {t['action']} on {target} (policy {t['policy']}), "
            f"reverted at the latest {_when(t['expires'])}"
        )
    silences = status.get("silences", [])
    out.append(f"silences ({len(silences)}):")
    out += [_silence_line(s) for s in silences]
    decisions = status.get("decisions", [])
    out.append(f"last decisions ({len(decisions)}):")
    out += [
        f"  {d['ts']} {d['policy']} {d['outcome']} {d['action'] or '-'} pid {d['pid']} "
        f"{d['comm']}: {d['message']}"
        for d in decisions
    ]
    return "\n".join(out)


def _silence_line(s: Mapping[str, Any]) -> str:
    match = " ".join(f"{k}={','.join(map(str, v))}" for k, v in s.get("match", {}).items())
    policies = ",".join(s.get("policies", [])) or "every policy"
    return (
        f"  {s['name']}: until {_when(s['expires'])}, {policies}, match {match or 'anything'}; "
        f"by {s['author']}: {s['reason']}"
    )


def _call(path: Path, payload: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    response = request(path, payload, timeout_s)
    if not response.get("ok"):
        raise ControlError(f"the agent refused {payload['op']}: {response.get('error', '?')}")
    return response


def _top(args: argparse.Namespace, out: TextIO | None) -> int:
    console = Console(file=out)
    rates = Rates()
    status = _call(args.socket, {"op": "status"})
    if args.once:
        console.print(render_top(status, rates.update(status, time.monotonic())))
        return 0
    with Live(render_top(status), console=console, screen=False, auto_refresh=False) as live:
        rates.update(status, time.monotonic())
        try:
            while True:
                time.sleep(args.interval)
                status = _call(args.socket, {"op": "status"})
                live.update(render_top(status, rates.update(status, time.monotonic())))
                live.refresh()
        except KeyboardInterrupt:
            return 0


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def expiry(text: str, now: float | None = None) -> str:
    """``--expires``: an ISO 8601 time with a timezone, or a duration from now ("1h", "30m");
    returned as ISO 8601 UTC, the form silence files use."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        return text  # the agent validates it like a silence file's expires
    when = (time.time() if now is None else now) + seconds
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def _silence(args: argparse.Namespace, out: TextIO) -> int:
    if args.silence_command == "add":
        match: dict[str, list[str]] = {}
        if args.comm:
            match["comms"] = args.comm
        if args.exe:
            match["exes"] = args.exe
        if args.cgroup:
            match["cgroups"] = args.cgroup
        name = args.name or f"cli-{_SAFE.sub('-', args.author)[:30]}-{int(time.time())}"
        silence = {
            "name": name,
            "author": args.author,
            "reason": args.reason,
            "expires": expiry(args.expires),
            "policies": args.policy or [],
            "match": match,
        }
        _call(args.socket, {"op": "silence-add", "silence": silence})
        print(f"silence {name} added, until {silence['expires']}", file=out)
        return 0
    if args.silence_command == "expire":
        _call(args.socket, {"op": "silence-expire", "name": args.silence_name})
        print(f"silence {args.silence_name} expired", file=out)
        return 0
    response = _call(args.socket, {"op": "silence-list"})
    silences = response.get("silences", [])
    if args.json:
        print(json.dumps(silences, indent=2), file=out)
    else:
        print(f"silences ({len(silences)}):", file=out)
        for s in silences:
            print(_silence_line(s), file=out)
    return 0


def _release(args: argparse.Namespace, out: TextIO) -> int:
    payload: dict[str, Any] = {"op": "release", "pid": args.pid}
    if args.policy:
        payload["policy"] = args.policy
    response = _call(args.socket, payload)
    reverted = response.get("reverted", [])
    print(f"released pid {args.pid}: {len(reverted)} change(s) reverted", file=out)
    for item in reverted:
        print(f"  {item if isinstance(item, str) else json.dumps(item)}", file=out)
    return 0


def add_parsers(sub: Any, default_socket: Path) -> None:
    """The client subcommands, added to the CLI's subparsers."""

    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", type=Path, default=default_socket, help="the control socket")
        return p

    status = with_socket(sub.add_parser("status", help="offenders, throttles, last decisions"))
    status.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    top = with_socket(sub.add_parser("top", help="live view: funnel per signal and offenders"))
    top.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    top.add_argument("--once", action="store_true", help="draw one frame and exit")

    silence = sub.add_parser("silence", help="add, list or expire silences in the running agent")
    ssub = silence.add_subparsers(dest="silence_command", required=True)
    add = with_socket(ssub.add_parser("add", help="no actions on matching processes for a while"))
    add.add_argument("--author", required=True)
    add.add_argument("--reason", required=True)
    add.add_argument("--expires", required=True, help="ISO 8601 with timezone, or 1h, 30m")
    add.add_argument("--name", help="default: cli-AUTHOR-EPOCH")
    add.add_argument("--policy", action="append", help="only these policies (default: all)")
    add.add_argument("--comm", action="append", help="exact process name")
    add.add_argument("--exe", action="append", help="exact executable path")
    add.add_argument("--cgroup", action="append", help="cgroup path glob")
    listing = with_socket(ssub.add_parser("list", help="the silences in force"))
    listing.add_argument("--json", action="store_true")
    expire = with_socket(ssub.add_parser("expire", help="end a silence now"))
    expire.add_argument("silence_name", metavar="NAME")

    release = with_socket(sub.add_parser("release", help="revert an offender's throttles"))
    release.add_argument("pid", type=int, metavar="PID")
    release.add_argument("--policy", help="only this policy's offender")


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one client subcommand (``args.command``); ControlError on any failure."""
    stream = out or sys.stdout
    if args.command == "status":
        status = _call(args.socket, {"op": "status"})
        print(json.dumps(status, indent=2) if args.json else format_status(status), file=stream)
        return 0
    if args.command == "top":
        return _top(args, out)
    if args.command == "silence":
        return _silence(args, stream)
    return _release(args, stream)
