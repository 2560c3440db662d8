"""``remedy explain``: draw the offender state machine, and say which policies would apply to a
described process, in which order, and why the others would not."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from transitions.extensions import GraphMachine

from remedy.engine.guards import Protector
from remedy.engine.offender import STATES, TRANSITIONS
from remedy.errors import RemedyError
from remedy.policy import SEVERITIES, Facts, PolicySet

_FACT_KEYS = ("cgroup", "comm", "exe", "cmdline", "uid", "container", "pod")


def draw_states(path: Path) -> Path:
    """Render the state machine with Graphviz, in the format the suffix names (.svg, .png)."""
    machine = GraphMachine(
        states=list(STATES),
        transitions=list(TRANSITIONS),
        initial="observed",
        auto_transitions=False,
        title="remedy: one offender under one policy",
        graph_engine="graphviz",  # Debian's `dot` through the graphviz package, not pygraphviz
    )
    try:
        machine.get_graph().draw(str(path), prog="dot", format=path.suffix.lstrip(".") or "svg")
    except (OSError, ImportError) as err:
        raise RemedyError(f"cannot draw {path}: {err} (install graphviz: make setup)") from err
    return path


def parse_facts(words: Sequence[str]) -> Facts:
    """``comm=worker exe=/usr/bin/worker uid=1000 cgroup=/system.slice/w.service ...``"""
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in _FACT_KEYS:
            raise RemedyError(
                f"describe the offender as key=value with keys {', '.join(_FACT_KEYS)}"
            )
        values[key] = value
    try:
        uid = int(values.get("uid", "-1"))
    except ValueError as err:
        raise RemedyError(f"uid must be a number: {values['uid']!r}") from err
    return Facts(
        cgroup=values.get("cgroup", "/"),
        comm=values.get("comm", ""),
        exe=values.get("exe"),
        cmdline=values.get("cmdline", ""),
        uid=uid,
        container_id=values.get("container"),
        pod_uid=values.get("pod"),
    )


def explain(policies: PolicySet, facts: Facts, now_wall: float | None = None) -> str:
    """Which policies apply to ``facts``, in precedence order, and why the others do not."""
    now_wall = time.time() if now_wall is None else now_wall
    lines = [f"offender: {facts}"]
    protector = Protector(0, frozenset()).extended(policies)
    if facts.exe in protector.exes:
        owners = sorted(protector.owners_of(facts.exe))
        if facts.uid >= 0 and facts.uid not in owners:
            lines.append(f"NOT PROTECTED: {facts.exe} is protected only when run as uid {owners}")
        else:
            lines.append(
                f"PROTECTED: {facts.exe} run as uid {owners}, started by the system (or a "
                "session of that uid), with no library injected: no policy will act on it"
            )
    # Precedence: higher severity first, then load order (see docs/policies.md).
    order = sorted(
        enumerate(policies.policies), key=lambda ip: (-SEVERITIES.index(ip[1].severity), ip[0])
    )
    for rank, (_, policy) in enumerate(order, 1):
        why_not = policy.applies_to(facts)
        head = (
            f"{rank}. {policy.name} [{policy.severity}, {policy.mode}] {policy.signal} "
            f"≥ {policy.threshold} per {policy.window_s:g} s → {policy.playbook}"
        )
        if why_not is not None:
            lines.append(f"{head}: does not apply ({why_not})")
            continue
        silences = [s for s in policies.silences if s.applies(policy.name, facts, now_wall)]
        note = "; ".join(f"silenced by {s.author}: {s.reason}" for s in silences)
        lines.append(f"{head}: APPLIES" + (f" ({note})" if note else ""))
    return "\n".join(lines)
