"""The full policy language: multi-document files, every kind, the new keys, every error class,
file safety, ``remedy check --format json`` and ``remedy schema``."""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remedy.cli import main
from remedy.errors import ConfigError, ConfigErrors
from remedy.policy import Breaker, Selector, check_paths, load_policy_set
from remedy.policy.loader import insecure
from remedy.policy.report import check_report
from remedy.policy.schema import KINDS, json_schema

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: fork-bomb
signal: fork_rate
threshold: 200
window: 1s
playbook: contain
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: contain
steps:
  - action: kill
"""

SILENCE = """\
apiVersion: remedy/v1
kind: Silence
name: db-migration
match: {cgroups: ["/system.slice/postgresql.service"]}
author: alice
reason: nightly migration forks a lot
expires: 2999-01-01T00:00:00Z
policies: [fork-bomb]
"""

PROTECTION = """\
apiVersion: remedy/v1
kind: Protection
name: site
exes: [/usr/local/bin/backup-agent, /opt/db/bin/postgres]
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, *docs: str) -> Any:
    """Load the documents as one multi-document file plus the playbook file."""
    conf = tmp_path / "conf"
    write(conf / "a.yaml", "---\n".join(docs))
    if not any("kind: Playbook" in d for d in docs):
        write(conf / "b-playbook.yaml", PLAYBOOK)
    return check_paths([conf])


def errors(tmp_path: Path, *docs: str) -> tuple[ConfigError, ...]:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, *docs)
    return info.value.errors


def only(found: Sequence[ConfigError]) -> ConfigError:
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


# --- multi-document files -----------------------------------------------------------------------


def test_one_file_holds_every_kind(tmp_path: Path) -> None:
    policy_set = load(tmp_path, POLICY, PLAYBOOK, SILENCE, PROTECTION)
    assert [p.name for p in policy_set.policies] == ["fork-bomb"]
    assert list(policy_set.playbooks) == ["contain"]
    (silence,) = policy_set.silences
    assert silence.author == "alice"
    assert silence.policies == ("fork-bomb",)
    assert silence.expires == 32472144000.0
    assert silence.match == Selector(cgroups=("/system.slice/postgresql.service",))
    assert policy_set.protected_exes == {"/usr/local/bin/backup-agent", "/opt/db/bin/postgres"}


def test_load_policy_set_reads_kinds_from_either_path(tmp_path: Path) -> None:
    pol = write(tmp_path / "p" / "all.yaml", "---\n".join([POLICY, SILENCE, PROTECTION]))
    play = write(tmp_path / "q" / "c.yaml", PLAYBOOK)
    policy_set = load_policy_set([pol.parent], [play.parent])
    assert len(policy_set.silences) == 1
    assert policy_set.protected_exes


def test_error_in_second_document_names_its_line(tmp_path: Path) -> None:
    bad = PLAYBOOK.replace("action: kill", "action: kil")
    error = only(errors(tmp_path, POLICY, bad))
    # POLICY is 7 lines, then "---" on line 8: the playbook starts on line 9, its step on 13.
    assert (error.file.name, error.key, error.line) == ("a.yaml", "steps.0.action", 13)


def test_yaml_error_in_second_document_keeps_first_documents_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, POLICY.replace("window: 1s", "window: soon"), "a: [\n")
    assert (found[0].key, found[0].line) == ("window", 6)
    assert "invalid YAML" in found[1].message
    assert found[1].line is not None
    assert found[1].line >= 9


def test_empty_documents_are_separators(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    write(conf / "a.yaml", "---\n" + POLICY + "---\n---\n" + PLAYBOOK + "---\n")
    assert len(check_paths([conf]).policies) == 1


def test_duplicate_names_in_one_file_name_the_first_line(tmp_path: Path) -> None:
    found = errors(tmp_path, POLICY, POLICY.replace("fork_rate", "exec_rate"))
    error = only(found)
    assert (error.key, error.line) == ("name", 11)
    assert re.search(r"duplicate policy name 'fork-bomb'; also in .*a\.yaml:3$", error.message)


@pytest.mark.parametrize("doc", [SILENCE, PROTECTION])
def test_duplicate_names_per_kind(tmp_path: Path, doc: str) -> None:
    error = only(errors(tmp_path, POLICY, doc, doc))
    assert error.key == "name"
    assert "duplicate" in error.message


def test_names_are_unique_per_kind_only(tmp_path: Path) -> None:
    protection = PROTECTION.replace("name: site", "name: fork-bomb")
    assert load(tmp_path, POLICY, protection).protected_exes


# --- policy keys -------------------------------------------------------------------------------


def test_new_policy_keys(tmp_path: Path) -> None:
    text = POLICY + textwrap.dedent(
        """\
        mode: monitor
        severity: critical
        for: 3
        exclude: {comms: [sshd]}
        breaker: {max_offenders: 5, per: 1m}
        match:
          exes: [/usr/bin/python3]
          cmdlines: ['--worker\\b']
          uids: [0, root, 1000]
          containers: [0123456789ab]
          pods: [0f8a7c2e-3b1d-4e5f-9a6b-7c8d9e0f1a2b]
        """
    )
    (policy,) = load(tmp_path, text).policies
    assert policy.dry_run is True
    assert policy.mode == "monitor"
    assert policy.severity == "critical"
    assert policy.sustain == 3
    assert policy.exclude == Selector(comms=("sshd",))
    assert policy.breaker == Breaker(max_offenders=5, per_s=60.0)
    assert policy.match == Selector(
        exes=("/usr/bin/python3",),
        cmdlines=("--worker\\b",),
        uids=(0, 0, 1000),
        containers=("0123456789ab",),
        pods=("0f8a7c2e-3b1d-4e5f-9a6b-7c8d9e0f1a2b",),
    )


def test_policy_defaults(tmp_path: Path) -> None:
    (policy,) = load(tmp_path, POLICY).policies
    assert (policy.mode, policy.severity, policy.sustain) == ("enforce", "warning", 1)
    assert policy.breaker == Breaker()
    assert policy.exclude.empty


@pytest.mark.parametrize(("key", "value"), [("dry_run", True), ("mode", "monitor")])
def test_dry_run_is_an_alias_of_mode(tmp_path: Path, key: str, value: object) -> None:
    (policy,) = load(tmp_path, POLICY + yaml.safe_dump({key: value})).policies
    assert policy.dry_run is True


def test_sustain_still_loads_with_a_warning(tmp_path: Path) -> None:
    conf = write(tmp_path / "c" / "a.yaml", POLICY + "sustain: 4\n---\n" + PLAYBOOK)
    warnings: list[ConfigError] = []
    (policy,) = check_paths([conf], warnings=warnings).policies
    assert policy.sustain == 4
    assert [(w.key, w.line) for w in warnings] == [("sustain", 8)]
    assert "old name of 'for'" in warnings[0].message


# --- every validation error class ---------------------------------------------------------------

BAD_POLICY_CASES = [
    # (extra lines or replacement, dotted key, line, needle)
    ("colour: red\n", "colour", 8, "unknown key 'colour'"),
    ("severity: high\n", "severity", 8, "'info', 'warning' or 'critical'"),
    ("mode: dry\n", "mode", 8, "'enforce' or 'monitor'"),
    ("mode: monitor\ndry_run: true\n", "dry_run", 9, "either 'mode' or 'dry_run'"),
    ("for: 2\nsustain: 2\n", "sustain", 9, "either 'for' or 'sustain'"),
    ("for: 0\n", "for", 8, "greater than or equal to 1"),
    ("for: '3'\n", "for", 8, "expected an integer"),
    ("match: {cmdlines: ['ok', '(unclosed']}\n", "match.cmdlines.1", 8, "missing ): (unclosed"),
    ("match: {uids: [no-such-user-remedy]}\n", "match.uids.0", 8, "unknown user"),
    ("match: {uids: [-1]}\n", "match.uids.0", 8, "out of range"),
    ("match: {exes: [sshd]}\n", "match.exes.0", 8, "not an absolute path"),
    ("match: {containers: [abc]}\n", "match.containers.0", 8, "12 or 64"),
    ("match: {pods: [my-pod]}\n", "match.pods.0", 8, "UUID"),
    ("match: {namespaces: [prod]}\n", "match.namespaces", 8, "cannot read Kubernetes metadata"),
    ("exclude:\n  labels: {app: db}\n", "exclude.labels", 9, "cannot read Kubernetes metadata"),
    ("breaker: {max_offenders: 0}\n", "breaker.max_offenders", 8, "greater than or equal"),
    ("breaker: {per: 0s}\n", "breaker.per", 8, "greater than 0"),
]


@pytest.mark.parametrize(("extra", "key", "line", "needle"), BAD_POLICY_CASES)
def test_policy_errors(tmp_path: Path, extra: str, key: str, line: int, needle: str) -> None:
    error = only(errors(tmp_path, POLICY + extra))
    assert (error.key, error.line) == (key, line)
    assert needle in error.message


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ("signal: fork_rate", "signal: fork_storm", "signal", "unknown signal"),
        ("playbook: contain", "playbook: nope", "playbook", "unknown playbook 'nope'"),
        ("window: 1s", "window: -1s", "window", "negative"),
        ("window: 1s", "window: 0s", "window", "greater than 0"),
        ("threshold: 200", "threshold: 0", "threshold", "greater than or equal to 1"),
        ("threshold: 200", "threshold: 2.5", "threshold", "expected an integer"),
    ],
)
def test_classic_errors(tmp_path: Path, old: str, new: str, key: str, needle: str) -> None:
    error = only(errors(tmp_path, POLICY.replace(old, new)))
    assert error.key == key
    assert needle in error.message


def test_bad_regex_carries_re2_error_message(tmp_path: Path) -> None:
    error = only(errors(tmp_path, POLICY + "match: {cmdlines: ['a{2,1}']}\n"))
    assert error.key == "match.cmdlines.0"
    assert "invalid repetition size: {2,1}" in error.message
    error = only(errors(tmp_path / "2", POLICY + "match: {cmdlines: ['[a-']}\n"))
    assert "missing ]: [a-" in error.message


def test_user_names_resolve_to_uids(tmp_path: Path) -> None:
    (policy,) = load(tmp_path, POLICY + "match: {uids: [root, nobody]}\n").policies
    import pwd  # noqa: PLC0415

    assert policy.match.uids == (0, pwd.getpwnam("nobody").pw_uid)


@pytest.mark.parametrize(
    ("expires", "needle"),
    [
        ("2h", "not a date and time"),
        ("'2999-01-01T00:00:00'", "has no timezone"),
        ("2999-01-01 00:00:00", "has no timezone"),
        ("2999-01-01", "date without a time"),
        ("12345", "expected a date and time"),
    ],
)
def test_bad_expiry(tmp_path: Path, expires: str, needle: str) -> None:
    text = SILENCE.replace("expires: 2999-01-01T00:00:00Z", f"expires: {expires}")
    error = only(errors(tmp_path, POLICY, text))
    assert (error.key, error.line) == ("expires", 15)
    assert needle in error.message
    assert "2025-06-01T18:00:00Z" in error.message


def test_quoted_expiry_with_offset(tmp_path: Path) -> None:
    text = SILENCE.replace("2999-01-01T00:00:00Z", "'2999-01-01T02:00:00+02:00'")
    (silence,) = load(tmp_path, POLICY, text).silences
    assert silence.expires == 32472144000.0


def test_expired_silence_is_a_warning(tmp_path: Path) -> None:
    text = SILENCE.replace("2999-01-01T00:00:00Z", "2001-01-01T00:00:00Z")
    conf = write(tmp_path / "c" / "a.yaml", "---\n".join([POLICY, PLAYBOOK, text]))
    warnings: list[ConfigError] = []
    assert len(check_paths([conf], warnings=warnings).silences) == 1
    warning = only(warnings)
    assert warning.key == "expires"
    assert "expired at 2001-01-01T00:00:00Z" in warning.message


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ("policies: [fork-bomb]", "policies: [fork-bomb, nope]", "policies.1", "unknown policy"),
        ("author: alice\n", "", "author", "missing required key 'author'"),
        ("reason: nightly migration forks a lot", "reason: ''", "reason", "at least 1"),
        ("match: {cgroups", "matches: {cgroups", "matches", "did you mean 'match'?"),
        ("match: {cgroups", "match: {labels: {a: b}, cgroups", "match.labels", "Kubernetes"),
    ],
)
def test_silence_errors(tmp_path: Path, old: str, new: str, key: str, needle: str) -> None:
    found = errors(tmp_path, POLICY, SILENCE.replace(old, new))
    error = next(e for e in found if e.key == key)
    assert needle in error.message


def test_silence_naming_a_broken_policy_reports_only_the_policy(tmp_path: Path) -> None:
    error = only(errors(tmp_path, POLICY + "colour: red\n", SILENCE))
    assert error.key == "colour"


@pytest.mark.parametrize(
    ("exes", "key", "needle"),
    [
        ("[/usr/sbin/sshd, sshd]", "exes.1", "never by name or substring"),
        ("[]", "exes", "at least 1"),
        ("/usr/sbin/sshd", "exes", "expected a list"),
    ],
)
def test_protection_errors(tmp_path: Path, exes: str, key: str, needle: str) -> None:
    text = PROTECTION.replace("[/usr/local/bin/backup-agent, /opt/db/bin/postgres]", exes)
    error = only(errors(tmp_path, POLICY, text))
    assert (error.key, error.line) == (key, 12)
    assert needle in error.message


def test_unknown_kind_lists_every_kind(tmp_path: Path) -> None:
    error = only(errors(tmp_path, POLICY, PROTECTION.replace("Protection", "Protect")))
    assert error.key == "kind"
    assert "Policy, Playbook, Silence or Protection" in error.message


def test_several_policies_load_on_one_signal(tmp_path: Path) -> None:
    notify = POLICY.replace("name: fork-bomb", "name: notify").replace("200", "100")
    ci = POLICY.replace("name: fork-bomb", "name: ci").replace("200", "300")
    ci += "match: {cgroups: ['/ci/*']}\n"
    slow = POLICY.replace("name: fork-bomb", "name: slow").replace("window: 1s", "window: 5s")
    policies = load(tmp_path, POLICY, notify, ci, slow)
    assert [p.name for p in policies.for_signal("fork_rate")] == [
        "fork-bomb",
        "notify",
        "ci",
        "slow",
    ]


def test_too_many_window_lengths_on_one_signal_names_the_file_and_line(tmp_path: Path) -> None:
    docs = [
        POLICY.replace("name: fork-bomb", f"name: w{i}").replace("window: 1s", f"window: {i}s")
        for i in range(1, 6)
    ]
    error = only(errors(tmp_path, *docs))
    assert error.key == "window"
    assert "at most 4 per signal" in error.message
    assert error.line is not None and error.line > 1  # the fifth document's window line


def test_too_many_tiers_on_one_signal(tmp_path: Path) -> None:
    docs = [POLICY.replace("name: fork-bomb", f"name: t{i}") for i in range(9)]
    error = only(errors(tmp_path, *docs))
    assert error.key == "signal"
    assert "at most 8 tiers" in error.message


def test_churn_policies_must_agree_on_lifetime(tmp_path: Path) -> None:
    churn = POLICY.replace("fork_rate", "churn")
    other = churn.replace("name: fork-bomb", "name: other") + "lifetime: 500ms\n"
    error = only(errors(tmp_path, churn, other))
    assert error.key == "lifetime"


def test_kernel_enforcement_only_where_the_kernel_can_signal(tmp_path: Path) -> None:
    scoped = POLICY + "match: {cgroups: ['/ci/*']}\nkernel: kill\n"
    assert load(tmp_path, scoped).policies[0].kernel == "kill"
    found = errors(tmp_path, scoped.replace("fork_rate", "open_rate"))
    assert [e.key for e in found] == ["kernel"]
    assert "fork_rate only" in found[0].message or "forker" in found[0].message
    unscoped = only(errors(tmp_path, POLICY + "kernel: kill\n"))
    assert unscoped.key == "kernel" and "name cgroups" in unscoped.message


# --- file safety --------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def secure_tree(tmp_path: Path) -> tuple[Path, Path]:
    conf = tmp_path / "conf"
    policy = write(conf / "a.yaml", POLICY + "---\n" + PLAYBOOK)
    conf.chmod(0o755)
    policy.chmod(0o644)
    return conf, policy


@needs_root
def test_root_owned_files_pass(tmp_path: Path) -> None:
    conf, _ = secure_tree(tmp_path)
    assert check_paths([conf], require_secure=True).policies
    assert load_policy_set([conf], [], require_secure=None).policies  # root: checked


@needs_root
@pytest.mark.parametrize(
    ("target", "mode", "uid", "needle"),
    [
        ("file", 0o664, 0, "writable by group or other"),
        ("file", 0o646, 0, "writable by group or other"),
        ("file", 0o644, 65534, "owned by uid 65534"),
        ("dir", 0o757, 0, "writable by group or other"),
        ("dir", 0o755, 65534, "owned by uid 65534"),
        ("file", 0o666, 65534, "owned by uid 65534 and writable by group or other"),
    ],
)
def test_insecure_files_are_refused(
    tmp_path: Path, target: str, mode: int, uid: int, needle: str
) -> None:
    conf, policy = secure_tree(tmp_path)
    path = policy if target == "file" else conf
    path.chmod(mode)
    os.chown(path, uid, 0)
    with pytest.raises(ConfigErrors) as info:
        load_policy_set([conf], [])  # require_secure defaults to True as root
    error = only(info.value.errors)
    assert error.file == policy
    assert error.message == (
        f"refusing {path}: {needle} (like sshd, remedy only loads root-owned configuration "
        "when running as root)"
    )
    # `remedy check` in CI runs as anyone on a checkout: not checked unless asked.
    assert check_paths([conf]).policies
    assert load_policy_set([conf], [], require_secure=False).policies


@needs_root
def test_insecure_symlink_target_is_refused(tmp_path: Path) -> None:
    _, policy = secure_tree(tmp_path)
    elsewhere = tmp_path / "open"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    moved = policy.rename(elsewhere / "a.yaml")
    policy.symlink_to(moved)
    assert insecure(policy) is not None


def test_shipped_files_would_pass_as_root() -> None:
    shipped = [REPO / "policies", REPO / "policies" / "examples", REPO / "playbooks"]
    files = [f for d in shipped for f in d.glob("*.yaml")]
    if any(f.stat().st_uid != 0 for f in files):
        pytest.skip("checkout not owned by root")
    assert [f for f in files if insecure(f) is not None] == []


# --- remedy check --format json, remedy schema ---------------------------------------------------


def test_check_json_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--format", "json", str(REPO / "policies"), str(REPO / "playbooks")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "ok": True,
        "errors": [],
        "policies": ["fork-bomb", "service-fork-storm"],
        "playbooks": [
            "contain-fork-bomb",
            "contain-service",
            "crash-loop",
            "fd-leak",
            "memory-leak",
            "tame-cpu-hog",
            "throttle",
        ],
        "silences": [],
        "protected_exes": [],
        "warnings": [],
    }


def test_check_json_errors_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expired = SILENCE.replace("2999", "2001")
    conf = write(tmp_path / "a.yaml", "---\n".join([POLICY + "thresold: 1\n", PLAYBOOK, expired]))
    assert main(["check", "--format", "json", str(conf)]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    report = json.loads(captured.out)
    assert report["ok"] is False
    assert report["policies"] == []
    (error,) = report["errors"]
    assert error["file"] == str(conf)
    assert (error["line"], error["key"]) == (8, "thresold")
    assert error["message"].startswith("unknown key 'thresold'")
    assert [w["key"] for w in report["warnings"]] == ["expires"]


def test_check_text_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write(
        tmp_path / "a.yaml", "---\n".join([POLICY, PLAYBOOK, SILENCE.replace("2999", "2001")])
    )
    assert main(["check", str(conf)]) == 0
    captured = capsys.readouterr()
    assert "ok: 1 policy(ies), 1 playbook(s)" in captured.out
    assert "warning: " in captured.err
    assert "expired" in captured.err


def test_check_report_matches_check_paths(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.yaml", "---\n".join([POLICY, PLAYBOOK, SILENCE, PROTECTION]))
    report = check_report([conf])
    assert report["ok"] is True
    assert report["silences"] == ["db-migration"]
    assert report["protected_exes"] == ["/opt/db/bin/postgres", "/usr/local/bin/backup-agent"]


def _keys(value: object, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every mapping key path in a YAML value, list items folded in (("match", "cgroups"))."""
    found: set[tuple[str, ...]] = set()
    if isinstance(value, dict):
        for key, child in value.items():
            found.add((*path, str(key)))
            found |= _keys(child, (*path, str(key)))
    elif isinstance(value, list):
        for child in value:
            found |= _keys(child, path)
    return found


def _properties(schema: dict[str, Any], node: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The schema node at ``path`` (following $ref, items and anyOf), None if not allowed.

    A free-form mapping (step ``params``, checked per action by the loader) allows any key.
    """
    for part in path:
        while True:
            if "$ref" in node:
                node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
            elif node.get("type") == "array":
                node = node["items"]
            elif "anyOf" in node:
                node = next(n for n in node["anyOf"] if n.get("type") != "null")
            else:
                break
        if "properties" not in node:
            return node  # free-form mapping
        node = node["properties"].get(part)
        if node is None:
            return None
    return node


def test_schema_covers_the_shipped_documents() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["discriminator"]["propertyName"] == "kind"
    assert set(schema["discriminator"]["mapping"]) == set(KINDS)
    kinds = []
    for ref in schema["oneOf"]:
        model = schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]
        kinds.append(model["properties"]["kind"]["const"])
        assert model["additionalProperties"] is False
    assert kinds == list(KINDS)
    files = [*REPO.glob("policies/**/*.yaml"), *REPO.glob("playbooks/*.yaml")]
    docs = [yaml.safe_load(f.read_text()) for f in files]
    docs += [yaml.safe_load(d) for d in (SILENCE, PROTECTION)]
    for doc in docs:
        root = schema["discriminator"]["mapping"][doc["kind"]]
        model = {"$ref": root}
        for path in _keys(doc):
            assert _properties(schema, model, path) is not None, (doc["name"], path)
    policy = json_schema("Policy")
    assert "for" in policy["properties"]
    assert "fork_rate" in policy["properties"]["signal"]["enum"]


def test_schema_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "--kind", "Silence"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["kind"]["const"] == "Silence"
    assert schema["properties"]["expires"]["format"] == "date-time"
    assert set(schema["required"]) >= {"author", "reason", "expires", "match"}
    assert main(["schema"]) == 0
    assert "oneOf" in json.loads(capsys.readouterr().out)


# --- junk never escapes as anything but ConfigErrors -------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        ["1s", "fork-bomb", "/usr/bin/x", "root", "((", "2999-01-01T00:00:00Z", "2h", *KINDS]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
_BASES = [POLICY, PLAYBOOK, SILENCE, PROTECTION]
_MATCH_KEYS = ["cgroups", "comms", "exes", "cmdlines", "uids", "containers", "pods", "labels"]


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    document: dict[Any, Any] = yaml.safe_load(draw(st.sampled_from(_BASES)))
    key = draw(st.sampled_from([*document, "match", "exclude", "mode", "for", "extra"]))
    if key in ("match", "exclude") and draw(st.booleans()):
        document[key] = {draw(st.sampled_from(_MATCH_KEYS)): draw(_values)}
    else:
        document[key] = draw(_values)
    return yaml.safe_dump(document)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(_mutated(), st.sampled_from(_BASES)), min_size=1, max_size=4))
def test_mutated_multi_document_files_only_raise_config_errors(
    tmp_path: Path, docs: list[str]
) -> None:
    path = tmp_path / "mutated.yaml"
    path.write_bytes("---\n".join(docs).encode("utf-8", "surrogatepass"))
    warnings: list[ConfigError] = []
    try:
        check_paths([path], warnings=warnings)
    except ConfigErrors as err:
        assert err.errors
        assert all(isinstance(e, ConfigError) for e in err.errors)
    assert all(isinstance(w, ConfigError) for w in warnings)
    report = check_report([path])
    json.dumps(report)  # always serialisable


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=120), st.text(max_size=120))
def test_junk_documents_only_raise_config_errors(tmp_path: Path, first: str, second: str) -> None:
    path = tmp_path / "junk.yaml"
    path.write_bytes(f"{first}\n---\n{second}".encode("utf-8", "surrogatepass"))
    try:
        check_paths([path])
    except ConfigErrors as err:
        assert all(isinstance(e, ConfigError) for e in err.errors)


def test_scope_is_read_and_checked(tmp_path: Path) -> None:
    from remedy.errors import ConfigErrors  # noqa: PLC0415
    from remedy.policy import load_policy_set  # noqa: PLC0415

    policies = tmp_path / "p"
    policies.mkdir()
    shipped = (REPO / "policies" / "fork-bomb.yaml").read_text()
    (policies / "fork.yaml").write_text(shipped + "scope: tree\n")
    loaded = load_policy_set([policies], [REPO / "playbooks"], require_secure=False)
    assert loaded.policies[0].scope == "tree"
    (policies / "fork.yaml").write_text(shipped + "scope: everything\n")
    with pytest.raises(ConfigErrors, match="scope"):
        load_policy_set([policies], [REPO / "playbooks"], require_secure=False)


def test_kernel_steps_are_only_for_signals(tmp_path: Path) -> None:
    from remedy.errors import ConfigErrors  # noqa: PLC0415
    from remedy.policy import load_policy_set  # noqa: PLC0415

    book = tmp_path / "b.yaml"
    book.write_text(
        "apiVersion: remedy/v1\nkind: Playbook\nname: contain-fork-bomb\nsteps:\n"
        "  - action: throttle_cpu\n    params: {cpu: 0.5}\n    kernel: true\n"
    )
    with pytest.raises(ConfigErrors, match="only for kill and stop"):
        load_policy_set([REPO / "policies" / "fork-bomb.yaml"], [book], require_secure=False)
    book.write_text(
        "apiVersion: remedy/v1\nkind: Playbook\nname: contain-fork-bomb\nsteps:\n"
        "  - action: kill\n    kernel: true\n"
    )
    loaded = load_policy_set([REPO / "policies" / "fork-bomb.yaml"], [book], require_secure=False)
    assert loaded.playbooks["contain-fork-bomb"].steps[0].kernel
