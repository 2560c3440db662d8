"""``remedy explain``: precedence order, why a policy does not apply, and the diagram."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_engine import PLAYBOOK, POLICY

from remedy.errors import RemedyError
from remedy.policy import PolicySet, Selector, Silence
from remedy.tools.explain import draw_states, explain, parse_facts


def test_policies_are_listed_in_precedence_order_with_reasons() -> None:
    cpu = replace(POLICY, name="cpu-hog", signal="cpu", severity="critical")
    web = replace(POLICY, name="web-only", signal="exec_rate", match=Selector(comms=("nginx",)))
    silence = Silence("s", Path("s.yaml"), Selector(), "bob", "deploy", expires=2e9)
    policies = PolicySet((POLICY, cpu, web), {PLAYBOOK.name: PLAYBOOK}, silences=(silence,))
    text = explain(policies, parse_facts(["comm=worker", "exe=/usr/bin/worker"]), now_wall=1e9)
    lines = text.splitlines()
    assert lines[1].startswith("1. cpu-hog [critical, enforce]")
    assert lines[2].startswith("2. fork-bomb [warning, enforce]")
    assert "APPLIES (silenced by bob: deploy)" in lines[2]
    assert "does not apply (match: comm 'worker' not in ['nginx'])" in lines[3]


def test_protected_executables_are_called_out() -> None:
    policies = PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK})
    assert "PROTECTED" in explain(policies, parse_facts(["exe=/usr/sbin/sshd"]))


def test_bad_descriptions_are_refused() -> None:
    with pytest.raises(RemedyError, match="key=value"):
        parse_facts(["nonsense"])
    with pytest.raises(RemedyError, match="uid must be a number"):
        parse_facts(["uid=root"])


def test_the_state_machine_is_drawn(tmp_path: Path) -> None:
    svg = draw_states(tmp_path / "states.svg").read_text()
    for state in ("observed", "suspect", "offending", "remediating", "cooldown", "released"):
        assert state in svg
