"""Policies on cgroup signals (issue 10, item 9): the offender is the cgroup, so the loader gives
such a policy scope cgroup and refuses what only a process has: a process scope, a comm, exe,
command line or uid to select by, and the kernel fast path (which signals one forking process).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from remedy.errors import ConfigError, ConfigErrors
from remedy.policy import PolicySet, load_policy_set

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: bomb-cgroup
signal: fork_rate_cgroup
threshold: 1000
window: 1s
playbook: contain
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: contain
steps:
  - action: quarantine
  - action: limit_pids
    params: {max: 16}
    scope: tree
  - action: kill
"""


def load(tmp_path: Path, policy: str, playbook: str = PLAYBOOK) -> PolicySet:
    for name, text in (("p.yaml", policy), ("b.yaml", playbook)):
        (tmp_path / name).write_text(textwrap.dedent(text))
    return load_policy_set([tmp_path / "p.yaml"], [tmp_path / "b.yaml"], require_secure=False)


def errors(tmp_path: Path, policy: str, playbook: str = PLAYBOOK) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, policy, playbook)
    return list(info.value.errors)


def test_a_cgroup_signal_policy_has_scope_cgroup(tmp_path: Path) -> None:
    [policy] = load(tmp_path, POLICY).policies
    assert policy.scope == "cgroup"
    [policy] = load(tmp_path, POLICY + "scope: cgroup\n").policies
    assert policy.scope == "cgroup"


@pytest.mark.parametrize("scope", ["process", "tree"])
def test_a_process_or_tree_scope_is_refused(tmp_path: Path, scope: str) -> None:
    [error] = errors(tmp_path, POLICY + f"scope: {scope}\n")
    assert error.key == "scope"
    assert "its offender is the cgroup" in error.message


@pytest.mark.parametrize(
    ("selector", "value"),
    [("comms", "[bash]"), ("exes", "[/bin/bash]"), ("cmdlines", "['^x']"), ("uids", "[0]")],
)
@pytest.mark.parametrize("where", ["match", "exclude"])
def test_process_selectors_are_refused(
    tmp_path: Path, where: str, selector: str, value: str
) -> None:
    [error] = errors(tmp_path, POLICY + f"{where}: {{{selector}: {value}}}\n")
    assert error.key == f"{where}.{selector}"
    assert "a cgroup has no" in error.message


def test_cgroup_selectors_are_fine(tmp_path: Path) -> None:
    [policy] = load(tmp_path, POLICY + "match: {cgroups: ['/system.slice/*']}\n").policies
    assert policy.match.cgroups == ("/system.slice/*",)


def test_a_process_scope_step_is_refused(tmp_path: Path) -> None:
    playbook = PLAYBOOK + "    scope: process\n"  # on the kill step
    [error] = errors(tmp_path, POLICY, playbook)
    assert error.key == "playbook"
    assert "step 3 (kill)" in error.message and "scope process" in error.message


def test_a_kernel_arm_is_refused(tmp_path: Path) -> None:
    playbook = PLAYBOOK + "    kernel: true\n"
    [error] = errors(tmp_path, POLICY, playbook)
    assert "arms the kernel fast path" in error.message


def test_process_signals_keep_their_scopes(tmp_path: Path) -> None:
    text = POLICY.replace("fork_rate_cgroup", "fork_rate") + "scope: tree\n"
    [policy] = load(tmp_path, text, PLAYBOOK + "    kernel: true\n").policies
    assert policy.scope == "tree"


def test_the_shipped_cgroup_examples_load(tmp_path: Path) -> None:
    for name in ("fork-bomb-cgroup.yaml", "exec-storm-cgroup.yaml"):
        policy_set = load_policy_set(
            [REPO / "policies" / "examples" / name], [REPO / "playbooks"], require_secure=False
        )
        assert [p.scope for p in policy_set.policies] == ["cgroup"]
