"""``remedy run`` and ``remedy check``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from remedy.errors import ConfigError, ConfigErrors, RemedyError
from remedy.policy import check_paths

if TYPE_CHECKING:
    from remedy.engine.decisions import DecisionSink
    from remedy.service.agent import Observer


_RUN_DEFAULTS: dict[str, object] = {}


def _apply_config(args: argparse.Namespace) -> None:
    """Fill every ``remedy run`` option the command line left at its default from --config."""
    from remedy.service.config import load_agent_config  # noqa: PLC0415

    doc = load_agent_config(args.config)
    from_file: dict[str, object] = {
        "policies": [Path(p) for p in doc.policies],
        "playbooks": [Path(p) for p in doc.playbooks],
        "dry_run": doc.dry_run,
        "sensor": doc.sensor,
        "quarantine_root": doc.quarantine_root,
        "journal": Path(doc.journal),
        "keep_throttles": doc.keep_throttles,
        "control_socket": Path(doc.control_socket or "none"),
        "audit": Path(doc.audit.path),
        "audit_max_bytes": doc.audit.max_bytes,
        "audit_keep": doc.audit.keep,
        "metrics": doc.metrics.address if doc.metrics else None,
        "alertmanager": doc.alerts.alertmanager,
        "webhook": doc.alerts.webhook,
        "alert_log": doc.alerts.log,
    }
    for dest, value in from_file.items():
        if getattr(args, dest) == _RUN_DEFAULTS.get(dest):
            setattr(args, dest, value)


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The options of ``remedy run``."""
    run = sub.add_parser("run", help="watch this host and act (or, with --dry-run, audit)")
    run.add_argument("--policies", type=Path, action="append", help="policy dir or file")
    run.add_argument("--playbooks", type=Path, action="append", help="playbook dir or file")
    run.add_argument("--dry-run", action="store_true", help="never act, whatever policies say")
    run.add_argument("--audit", type=Path, help="append decisions as JSON lines here")
    run.add_argument(
        "--audit-max-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="rotate the audit file when a line would take it past this size",
    )
    run.add_argument("--audit-keep", type=int, default=5, help="rotated audit files to keep")
    run.add_argument("--duration", type=float, help="stop by itself after this many seconds")
    run.add_argument("--quarantine-root", default="/remedy", help="cgroup for quarantines")
    run.add_argument("--stats", type=Path, help="write run statistics as JSON here at exit")
    run.add_argument("--naive", action="store_true", help="benchmark baseline: count in Python")
    run.add_argument(
        "--sensor",
        choices=("auto", "kernel", "sampler"),
        default="auto",
        help="auto: the kernel funnel, or the /proc sampler (loudly) where BPF cannot load",
    )
    run.add_argument("--ringbuf-pages", type=int, default=16, help="ring buffer size in pages")
    run.add_argument(
        "--journal",
        type=Path,
        default=Path("/var/lib/remedy/undo.jsonl"),
        help="undo journal: every reversible change, written before it is applied",
    )
    run.add_argument(
        "--control-socket",
        type=Path,
        default=Path("/run/remedy/control.sock"),
        help="Unix socket for remedy status/top/silence/release (root only); 'none' disables",
    )
    run.add_argument(
        "--keep-throttles",
        action="store_true",
        help="on shutdown leave reversible changes in place until their TTL (default: revert)",
    )
    run.add_argument(
        "--print-bpf",
        "--ebpf",
        action="store_true",
        help="print the kernel program with the policies' parameters, and exit",
    )
    run.add_argument(
        "--metrics", metavar="ADDR", help="serve Prometheus metrics on host:port (default: off)"
    )
    run.add_argument("--alertmanager", metavar="URL", help="send alerts to this Alertmanager")
    run.add_argument("--webhook", metavar="URL", help="POST alerts as JSON to this URL")
    run.add_argument(
        "--alert-log",
        action="store_true",
        help="also write alerts (firing/resolved, one per incident) to stdout: the journal",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument(
        "--config", type=Path, help="agent configuration file (kind: AgentConfig); flags win"
    )
    # What each option is when not given, so a config file can fill in only those.
    _RUN_DEFAULTS.update({action.dest: action.default for action in run._actions})


def _add_reconcile(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The options of ``remedy reconcile``: the journal and the roots, nothing else."""
    rec = sub.add_parser(
        "reconcile",
        help="with no agent running: revert what has expired in the undo journal (no policies, "
        "no BPF); exit 75 without touching anything when an agent holds the journal",
    )
    rec.add_argument("--journal", type=Path, default=Path("/var/lib/remedy/undo.jsonl"))
    rec.add_argument("--all", action="store_true", help="revert everything, expired or not")
    rec.add_argument("--cgroup-root", type=Path, default=Path("/sys/fs/cgroup"))
    rec.add_argument("--proc-root", type=Path, default=Path("/proc"))
    rec.add_argument("--quarantine-root", default="/remedy", help="the agent's, for quarantines")
    rec.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="keep running: one pass every SECONDS until SIGTERM (a Kubernetes sidecar)",
    )


def _reconcile(args: argparse.Namespace) -> int:
    from remedy.service import reconcile  # noqa: PLC0415 - keeps `check` light

    opts = reconcile.ReconcileOptions(
        journal=args.journal,
        revert_all=args.all,
        cgroup_root=args.cgroup_root,
        proc_root=args.proc_root,
        quarantine_root=args.quarantine_root,
    )
    return reconcile.main(opts, sys.stdout, every_s=args.every)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remedy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run(sub)

    _add_reconcile(sub)

    check = sub.add_parser("check", help="validate policies and playbooks")
    check.add_argument("paths", type=Path, nargs="*", default=[Path("policies"), Path("playbooks")])
    check.add_argument(
        "--format", choices=("text", "json"), default="text", help="json: one report on stdout"
    )

    schema = sub.add_parser("schema", help="print the JSON Schema of policy files, for editors")
    schema.add_argument("--kind", choices=("Policy", "Playbook", "Silence", "Protection"))

    explain = sub.add_parser("explain", help="draw the state machine; which policies apply")
    explain.add_argument("--policies", type=Path, action="append", help="policy dir or file")
    explain.add_argument("--playbooks", type=Path, action="append", help="playbook dir or file")
    explain.add_argument("--diagram", type=Path, help="write the state machine here (.svg, .png)")
    explain.add_argument(
        "offender", nargs="*", help="key=value facts: cgroup comm exe cmdline uid container pod"
    )

    doctor = sub.add_parser("doctor", help="report what this host offers; exit 1 if BPF cannot run")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    from remedy.tools import top  # noqa: PLC0415 - the control socket's client commands

    top.add_parsers(sub, top.DEFAULT_SOCKET)

    record = sub.add_parser("record", help="record what crosses the funnel to a trace; no actions")
    record.add_argument("--duration", type=float, help="stop by itself after this many seconds")
    record.add_argument("--out", type=Path, required=True, help="write the trace (JSON lines) here")
    record.add_argument("--policies", type=Path, action="append", help="policy dir or file")
    record.add_argument("--playbooks", type=Path, action="append", help="playbook dir or file")
    record.add_argument("--sensor", choices=("auto", "kernel", "sampler"), default="auto")

    replay = sub.add_parser("replay", help="run policies over a trace; exit 3 if --against differs")
    replay.add_argument("trace", type=Path, help="a trace written by `remedy record`")
    replay.add_argument("--policies", type=Path, action="append", required=True)
    replay.add_argument("--playbooks", type=Path, action="append", default=[])
    replay.add_argument("--against", type=Path, action="append", default=[], help="other policies")
    replay.add_argument("--against-playbooks", type=Path, action="append", default=[])
    replay.add_argument("--format", choices=("text", "json"), default="text")

    _audit_arguments(
        sub.add_parser(
            "audit",
            help="query the audit log; --verify: exit 4 if the chain broke, "
            "5 if an intent has no outcome",
        )
    )
    return parser


def _audit_arguments(audit: argparse.ArgumentParser) -> None:
    audit.add_argument("path", type=Path, nargs="?", default=Path("audit.jsonl"))
    audit.add_argument("--since", help="ISO 8601 time, or a duration back from now like 1h")
    audit.add_argument("--policy", help="only this policy's decisions")
    audit.add_argument("--outcome", help="only this outcome (acted, would-act, skipped, ...)")
    audit.add_argument("--pid", type=int, help="only decisions about this pid")
    audit.add_argument("--verify", action="store_true", help="check the hash chain across files")
    audit.add_argument("--format", choices=("text", "json"), default="text")


def _record(args: argparse.Namespace) -> int:
    from remedy.tools.trace import Recorder, RecordOptions  # noqa: PLC0415 - needs bcc

    recorder = Recorder(
        RecordOptions(
            out_path=args.out,
            policy_paths=tuple(args.policies or [Path("policies")]),
            playbook_paths=tuple(args.playbooks or [Path("playbooks")]),
            duration_s=args.duration,
            sensor=args.sensor,
        )
    )

    def _stop(signum: int, _frame: FrameType | None) -> None:
        print(f"\nstopping ({signal.Signals(signum).name})", flush=True)
        recorder.request_stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    recorder.run()
    return 0


def _replay(args: argparse.Namespace) -> int:
    from remedy.tools import replay  # noqa: PLC0415

    return replay.main(
        args.trace,
        args.policies,
        args.playbooks,
        against=args.against,
        against_playbooks=args.against_playbooks,
        fmt=args.format,
        out=sys.stdout,
    )


def _check(paths: Sequence[Path], fmt: str = "text") -> int:
    if fmt == "json":
        from remedy.policy.report import check_report  # noqa: PLC0415

        report = check_report(paths)
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    warnings: list[ConfigError] = []
    try:
        policy_set = check_paths(paths, warnings=warnings)
    finally:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {len(policy_set.policies)} policy(ies), {len(policy_set.playbooks)} playbook(s)")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from remedy.policy import load_policy_set  # noqa: PLC0415
    from remedy.tools.explain import draw_states, explain, parse_facts  # noqa: PLC0415

    if args.diagram:
        print(f"state machine drawn to {draw_states(args.diagram)}")
    if args.offender or not args.diagram:
        policies = load_policy_set(
            tuple(args.policies or [Path("policies")]),
            tuple(args.playbooks or [Path("playbooks")]),
        )
        print(explain(policies, parse_facts(args.offender)))
    return 0


def _run(args: argparse.Namespace) -> int:
    # Imported here so `remedy check` works on a host without bcc or cgroups.
    from remedy.compiler import compile_plan  # noqa: PLC0415
    from remedy.policy import load_policy_set  # noqa: PLC0415
    from remedy.sensors.kernel import KernelSensor  # noqa: PLC0415
    from remedy.sensors.startup import bpf_plan  # noqa: PLC0415
    from remedy.service.agent import Agent, AgentOptions  # noqa: PLC0415

    if args.config is not None:
        _apply_config(args)
    policy_paths = tuple(args.policies or [Path("policies")])
    playbook_paths = tuple(args.playbooks or [Path("playbooks")])
    if args.print_bpf:
        policies = load_policy_set(policy_paths, playbook_paths)
        plan = compile_plan(policies)
        print(KernelSensor(naive=args.naive).source(bpf_plan(plan)))
        return 0
    options = AgentOptions(
        policy_paths=policy_paths,
        playbook_paths=playbook_paths,
        dry_run=args.dry_run,
        audit_path=args.audit,
        audit_max_bytes=args.audit_max_bytes,
        audit_keep=args.audit_keep,
        duration_s=args.duration,
        quarantine_root=args.quarantine_root,
        stats_path=args.stats,
        naive=args.naive,
        sensor=args.sensor,
        ringbuf_pages=args.ringbuf_pages,
        journal_path=args.journal,
        control_socket=None if str(args.control_socket) == "none" else args.control_socket,
        keep_throttles=args.keep_throttles,
    )
    sinks, observers, closers = _observability(args)
    agent = Agent(options, sinks=sinks, observers=observers)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        print(f"\nstopping ({signal.Signals(signum).name})", flush=True)
        agent.request_stop()

    def _reload(_signum: int, _frame: FrameType | None) -> None:
        agent.request_reload()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _reload)
    try:
        agent.run()
    finally:
        for close in closers:
            close()
    return 0


def _observability(
    args: argparse.Namespace,
) -> tuple[list[DecisionSink], list[Observer], list[Callable[[], None]]]:
    """--metrics, --alertmanager, --webhook: sinks and observers for the agent, and what to
    close when it stops."""
    from remedy.service.alerts import (  # noqa: PLC0415
        Alerter,
        AlertmanagerTarget,
        AlertTarget,
        LogTarget,
        WebhookTarget,
    )
    from remedy.service.metrics import Metrics  # noqa: PLC0415

    sinks: list[DecisionSink] = []
    observers: list[Observer] = []
    closers: list[Callable[[], None]] = []
    if args.metrics:
        host, sep, port = args.metrics.rpartition(":")
        if not sep or not port.isdigit():
            raise RemedyError(f"--metrics {args.metrics!r}: expected host:port")
        metrics = Metrics()
        print(f"metrics: {metrics.enable_bpf_stats()}", flush=True)
        bound = metrics.serve(host.strip("[]") or "0.0.0.0", int(port))
        print(f"metrics: serving on http://{host or '0.0.0.0'}:{bound}/metrics", flush=True)
        sinks.append(metrics)
        observers.append(metrics)
        closers.append(metrics.close)
    targets: list[AlertTarget] = []
    if args.alertmanager:
        targets.append(AlertmanagerTarget(args.alertmanager))
    if args.webhook:
        targets.append(WebhookTarget(args.webhook))
    if args.alert_log:
        targets.append(LogTarget(sys.stdout))
    if targets:
        alerter = Alerter(targets)
        sinks.append(alerter)
        observers.append(alerter)
        closers.append(alerter.close)
    return sinks, observers, closers


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 on success, 1 when the configuration is invalid, 2 on any other remedy error, 3
    when `replay --against` finds the two policy sets deciding differently, 4 when `audit --verify`
    finds the audit chain broken, 5 when it finds an intent with no outcome, 75 when `reconcile`
    finds the journal held by an agent (2 when a revert failed: it stays in the journal)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "check":
            return _check(args.paths, args.format)
        if args.command == "reconcile":
            return _reconcile(args)
        if args.command == "schema":
            from remedy.policy.schema import json_schema  # noqa: PLC0415

            print(json.dumps(json_schema(args.kind), indent=2))
            return 0
        if args.command == "explain":
            return _explain(args)
        if args.command == "record":
            return _record(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "audit":
            from remedy.tools import auditquery  # noqa: PLC0415

            return auditquery.main(
                args.path,
                since=args.since,
                policy=args.policy,
                outcome=args.outcome,
                pid=args.pid,
                check=args.verify,
                fmt=args.format,
            )
        if args.command == "doctor":
            from remedy.tools.doctor import run_doctor  # noqa: PLC0415 - keeps `check` light

            return run_doctor(as_json=args.json)
        if args.command in ("status", "top", "silence", "release"):
            from remedy.tools import top  # noqa: PLC0415

            return top.main(args)
        return _run(args)
    except ConfigErrors as err:
        print(f"invalid configuration ({len(err.errors)} error(s)):", file=sys.stderr)
        for error in err.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    except RemedyError as err:
        print(f"remedy: {err}", file=sys.stderr)
        return 2
