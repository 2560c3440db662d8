"""The policy loader on fixture trees: what loads, and how precisely every mistake is reported."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remedy.actions.params import KillParams, QuarantineParams
from remedy.errors import ConfigError, ConfigErrors
from remedy.policy import (
    Playbook,
    Policy,
    PolicySet,
    RateLimit,
    Selector,
    Step,
    check_paths,
    load_policy_set,
)

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: fork-bomb
signal: fork_rate
threshold: 200
window: 1s
playbook: contain
cooldown: 2s
release_after: 10s
rate_limit: {max_actions: 3, per: 1m}
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: contain
steps:
  - action: quarantine
    params: {pids_max: 16}
  - action: kill
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def tree(tmp_path: Path, policies: dict[str, str], playbooks: dict[str, str]) -> tuple[Path, Path]:
    """A policies/ and a playbooks/ directory holding the given files."""
    pol, play = tmp_path / "policies", tmp_path / "playbooks"
    pol.mkdir()
    play.mkdir()
    for name, text in policies.items():
        write(pol / name, text)
    for name, text in playbooks.items():
        write(play / name, text)
    return pol, play


def errors_of(
    policies: dict[str, str], tmp_path: Path, playbooks: dict[str, str] | None = None
) -> tuple[ConfigError, ...]:
    pol, play = tree(
        tmp_path, policies, {"contain.yaml": PLAYBOOK} if playbooks is None else playbooks
    )
    with pytest.raises(ConfigErrors) as info:
        load_policy_set([pol], [play])
    return info.value.errors


def only(errors: Sequence[ConfigError]) -> ConfigError:
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


def test_shipped_files_load() -> None:
    policy_set = load_policy_set([REPO / "policies"], [REPO / "playbooks"])
    policy, service = policy_set.for_signal("fork_rate")  # they split the processes between them
    assert (policy.name, service.name) == ("fork-bomb", "service-fork-storm")
    assert policy.exclude == service.match
    assert policy.threshold == 200
    assert policy.window_s == 1.0
    assert policy.release_after_s > policy.window_s
    assert policy.match == Selector()
    assert [s.action for s in policy_set.playbook_for(service).steps] == ["quarantine", "notify"]
    playbook = policy_set.playbook_for(policy)
    assert [step.action for step in playbook.steps] == ["quarantine", "kill"]
    assert playbook.steps[0].params == QuarantineParams(pids_max=32, cpu=0.2)
    assert playbook.steps[1].params == KillParams(signal="SIGKILL")


def test_shipped_files_pass_check() -> None:
    policy_set = check_paths([REPO / "policies", REPO / "playbooks"])
    assert [p.name for p in policy_set.policies] == ["fork-bomb", "service-fork-storm"]
    assert sorted(policy_set.playbooks) == [
        "contain-fork-bomb",
        "contain-service",
        "crash-loop",
        "fd-leak",
        "memory-leak",
        "tame-cpu-hog",
        "throttle",
    ]


def test_loads_into_records(tmp_path: Path) -> None:
    pol, play = tree(tmp_path, {"fork-bomb.yaml": POLICY}, {"contain.yml": PLAYBOOK})
    policy_set = load_policy_set([pol], [play])
    assert policy_set.policies == (
        Policy(
            name="fork-bomb",
            file=pol / "fork-bomb.yaml",
            signal="fork_rate",
            threshold=200,
            window_s=1.0,
            playbook="contain",
            dry_run=False,
            cooldown_s=2.0,
            release_after_s=10.0,
            rate_limit=RateLimit(max_actions=3, per_s=60.0),
            match=Selector(),
        ),
    )
    assert policy_set.playbooks["contain"] == Playbook(
        name="contain",
        file=play / "contain.yml",
        steps=(Step("quarantine", QuarantineParams(pids_max=16)), Step("kill", KillParams())),
    )


def test_defaults(tmp_path: Path) -> None:
    minimal = "\n".join(
        line for line in POLICY.splitlines() if not line.startswith(("cooldown", "release", "rate"))
    )
    pol, play = tree(tmp_path, {"p.yaml": minimal}, {"contain.yaml": PLAYBOOK})
    (policy,) = load_policy_set([pol], [play]).policies
    assert policy.cooldown_s == 5.0
    assert policy.release_after_s == 60.0
    assert policy.rate_limit == RateLimit(max_actions=10, per_s=60.0)
    assert policy.dry_run is False
    assert policy.description == ""
    assert policy.match == Selector()


def test_match_selector(tmp_path: Path) -> None:
    text = POLICY + "match:\n  cgroups: ['/user.slice/*']\n  comms: [bash]\n"
    pol, play = tree(tmp_path, {"p.yaml": text}, {"contain.yaml": PLAYBOOK})
    (policy,) = load_policy_set([pol], [play]).policies
    assert policy.match == Selector(cgroups=("/user.slice/*",), comms=("bash",))
    assert policy.match.matches("/user.slice/user-1000.slice/session-2.scope", "bash")
    assert not policy.match.matches("/system.slice/cron.service", "bash")
    assert not policy.match.matches("/user.slice/x", "python3")
    assert Selector().matches("/anything", "anything")


def test_unknown_top_level_key_names_key_and_line(tmp_path: Path) -> None:
    error = only(errors_of({"p.yaml": POLICY + "thresold: 5\n"}, tmp_path))
    assert error.key == "thresold"
    assert error.line == 11
    assert error.message.startswith("unknown key 'thresold'")
    assert "did you mean 'threshold'?" in error.message


def test_unknown_nested_key_names_dotted_key_and_line(tmp_path: Path) -> None:
    text = POLICY.replace(
        "rate_limit: {max_actions: 3, per: 1m}", "rate_limit:\n  max_actions: 3\n  burst: 5\n"
    )
    error = only(errors_of({"p.yaml": text}, tmp_path))
    assert (error.key, error.line) == ("rate_limit.burst", 12)
    assert error.message.startswith("unknown key 'burst'")
    assert "max_actions, per" in error.message


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    error = only(errors_of({"p.yaml": POLICY + "match: {cgroups: [/a\n"}, tmp_path))
    assert error.key == ""
    assert error.line is not None
    assert error.line >= 11
    assert "invalid YAML" in error.message


def test_control_character_names_line(tmp_path: Path) -> None:
    error = only(errors_of({"p.yaml": POLICY + "description: a\x07b\n"}, tmp_path))
    assert (error.key, error.line) == ("", 11)
    assert "#x0007" in error.message


def test_yaml_value_pyyaml_cannot_construct_is_a_config_error(tmp_path: Path) -> None:
    # PyYAML resolves this as a timestamp, then datetime raises a bare ValueError.
    error = only(errors_of({"p.yaml": POLICY + "description: 2024-13-45\n"}, tmp_path))
    assert "invalid YAML" in error.message


def test_unknown_playbook(tmp_path: Path) -> None:
    error = only(
        errors_of({"p.yaml": POLICY.replace("playbook: contain", "playbook: nope")}, tmp_path)
    )
    assert (error.key, error.line) == ("playbook", 7)
    assert "unknown playbook 'nope'" in error.message
    assert "contain" in error.message


def test_invalid_playbook_does_not_also_report_unknown_playbook(tmp_path: Path) -> None:
    broken = PLAYBOOK.replace("pids_max: 16", "pids_max: 0")
    error = only(errors_of({"p.yaml": POLICY}, tmp_path, {"contain.yaml": broken}))
    assert error.key == "steps.0.params.pids_max"


def test_a_limit_of_the_kernel_names_the_file_and_line_of_the_policy_past_it(
    tmp_path: Path,
) -> None:
    # Four window lengths fit one signal; the fifth policy's file and line are named.
    files = {
        f"{i}.yaml": POLICY.replace("name: fork-bomb", f"name: w{i}").replace(
            "window: 1s", f"window: {i}s"
        )
        for i in range(1, 6)
    }
    error = only(errors_of(files, tmp_path))
    assert error.file.name == "5.yaml"
    assert error.key == "window" and error.line is not None
    assert "at most 4 per signal" in error.message


def test_duplicate_names(tmp_path: Path) -> None:
    errors = errors_of(
        {"a.yaml": POLICY, "b.yaml": POLICY},
        tmp_path,
        {"a.yaml": PLAYBOOK, "b.yaml": PLAYBOOK},
    )
    messages = [(e.file.name, e.key, e.message) for e in errors]
    assert any("duplicate playbook name 'contain'" in m for _, _, m in messages)
    assert any("duplicate policy name 'fork-bomb'" in m for _, _, m in messages)
    assert all(name == "b.yaml" for name, _, _ in messages)


def test_bad_duration(tmp_path: Path) -> None:
    error = only(
        errors_of({"p.yaml": POLICY.replace("window: 1s", "window: 1 fortnight")}, tmp_path)
    )
    assert (error.key, error.line) == ("window", 6)
    assert "unknown unit" in error.message


@pytest.mark.parametrize(("window", "release"), [("10s", "10s"), ("1m", "30s")])
def test_release_after_must_exceed_window(tmp_path: Path, window: str, release: str) -> None:
    text = POLICY.replace("window: 1s", f"window: {window}").replace(
        "release_after: 10s", f"release_after: {release}"
    )
    error = only(errors_of({"p.yaml": text}, tmp_path))
    assert (error.key, error.line) == ("release_after", 9)
    assert "longer than window" in error.message


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        ("threshold: 200", "threshold: '200'", 5),  # strict: a quoted number is not a number
        ("threshold: 200", "threshold: 0", 5),
        ("threshold: 200", "threshold: 1.5", 5),
        ("window: 1s", "window: 0s", 6),
        ("cooldown: 2s", "cooldown: -1s", 8),
        ("cooldown: 2s", "dry_run: 'false'", 8),
        ("signal: fork_rate", "signal: fork_storm", 4),
        ("name: fork-bomb", "name: 'fork bomb!'", 3),
        ("per: 1m", "per: true", 10),
    ],
)
def test_bad_values(tmp_path: Path, old: str, new: str, line: int) -> None:
    error = only(errors_of({"p.yaml": POLICY.replace(old, new)}, tmp_path))
    key = new.split(":", maxsplit=1)[0]
    assert error.key == (f"rate_limit.{key}" if key == "per" else key)
    assert error.line == line


def test_comm_longer_than_kernel_keeps_is_rejected(tmp_path: Path) -> None:
    text = POLICY + "match:\n  comms: [bash, a-very-long-process-name]\n"
    error = only(errors_of({"p.yaml": text}, tmp_path))
    assert (error.key, error.line) == ("match.comms.1", 12)
    assert "TASK_COMM_LEN" in error.message


def test_missing_key_points_at_enclosing_mapping(tmp_path: Path) -> None:
    text = POLICY.replace(
        "rate_limit: {max_actions: 3, per: 1m}", "rate_limit:\n  max_actions: x\n"
    )
    errors = errors_of({"p.yaml": POLICY.replace("threshold: 200\n", "")}, tmp_path)
    assert only(errors).key == "threshold"
    assert "missing required key 'threshold'" in only(errors).message
    (tmp_path / "policies" / "p.yaml").write_text(text)
    with pytest.raises(ConfigErrors) as info:
        load_policy_set([tmp_path / "policies"], [tmp_path / "playbooks"])
    error = only(info.value.errors)
    assert (error.key, error.line) == ("rate_limit.max_actions", 11)


def test_params_errors(tmp_path: Path) -> None:
    playbook = """\
    apiVersion: remedy/v1
    kind: Playbook
    name: contain
    steps:
      - action: quarantine
        params: {pids_max: 0}
      - action: kill
        params:
          signal: SIGHUP
          sig: 9
      - action: explode
    """
    errors = errors_of({"p.yaml": POLICY}, tmp_path, {"contain.yaml": playbook})
    found = {(e.key, e.line) for e in errors}
    assert found == {
        ("steps.0.params.pids_max", 6),
        ("steps.1.params.signal", 9),
        ("steps.1.params.sig", 10),
        ("steps.2.action", 11),
    }
    unknown = next(e for e in errors if e.key == "steps.2.action")
    assert "unknown action 'explode'" in unknown.message
    assert "kill" in unknown.message and "quarantine" in unknown.message


def test_playbook_needs_steps(tmp_path: Path) -> None:
    playbook = "apiVersion: remedy/v1\nkind: Playbook\nname: contain\nsteps: []\n"
    error = only(errors_of({"p.yaml": POLICY}, tmp_path, {"contain.yaml": playbook}))
    assert (error.key, error.line) == ("steps", 4)


def test_kind_decides_wherever_the_file_is(tmp_path: Path) -> None:
    # A playbook in the policies directory is a playbook: no "wrong directory" error.
    pol, play = tree(tmp_path, {"p.yaml": POLICY, "x.yaml": PLAYBOOK}, {})
    policy_set = load_policy_set([pol], [play])
    assert list(policy_set.playbooks) == ["contain"]


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        (POLICY.replace("remedy/v1", "remedy/v2"), "apiVersion", "unsupported apiVersion"),
        (POLICY.replace("apiVersion: remedy/v1\n", ""), "apiVersion", "missing"),
        (POLICY.replace("kind: Policy", "kind: Polcy"), "kind", "unknown kind"),
        ("- a\n- b\n", "", "expected a mapping"),
        ("", "", "empty"),
    ],
)
def test_document_shape(tmp_path: Path, text: str, key: str, needle: str) -> None:
    errors = errors_of({"p.yaml": text, "q.yaml": POLICY.replace("fork-bomb", "q")}, tmp_path)
    error = only([e for e in errors if e.file.name == "p.yaml"])
    assert error.key == key
    assert needle in error.message


def test_duplicate_key_in_mapping(tmp_path: Path) -> None:
    error = only(errors_of({"p.yaml": POLICY + "threshold: 5\n"}, tmp_path))
    assert (error.key, error.line) == ("threshold", 11)
    assert "duplicate key" in error.message


def test_collects_errors_from_every_file(tmp_path: Path) -> None:
    bad_playbook = PLAYBOOK.replace("name: contain", "name: contain\ncolour: red")
    errors = errors_of(
        {"a.yaml": POLICY.replace("window: 1s", "window: soon")}, tmp_path, {"c.yaml": bad_playbook}
    )
    assert {(e.file.name, e.key) for e in errors} == {("a.yaml", "window"), ("c.yaml", "colour")}


def test_no_policies(tmp_path: Path) -> None:
    error = only(errors_of({"README.md": "not yaml: ["}, tmp_path))
    assert "no policies found" in error.message


def test_missing_path(tmp_path: Path) -> None:
    pol, play = tree(tmp_path, {"p.yaml": POLICY}, {"contain.yaml": PLAYBOOK})
    with pytest.raises(ConfigErrors) as info:
        load_policy_set([pol, tmp_path / "nowhere"], [play])
    error = only(info.value.errors)
    assert error.file == tmp_path / "nowhere"


def test_check_paths_mixed(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    write(mixed / "a-policy.yaml", POLICY)
    write(mixed / "b-playbook.yaml", PLAYBOOK)
    write(mixed / "notes.txt", "ignored")
    second = POLICY.replace("fork-bomb", "second").replace("window: 1s", "window: 2s")
    extra = write(tmp_path / "single.yml", second)
    policy_set = check_paths([mixed, mixed / "a-policy.yaml"])
    assert [p.name for p in policy_set.policies] == ["fork-bomb"]  # the same file counts once
    assert list(policy_set.playbooks) == ["contain"]
    # A second policy on the signal, with another window: a second tier, not an error.
    both = check_paths([mixed, extra])
    assert [p.name for p in both.for_signal("fork_rate")] == ["fork-bomb", "second"]


def test_check_paths_needs_the_playbook_among_the_paths(tmp_path: Path) -> None:
    file = write(tmp_path / "p.yaml", POLICY)
    with pytest.raises(ConfigErrors) as info:
        check_paths([file])
    error = only(info.value.errors)
    assert (error.key, error.line) == ("playbook", 7)
    assert "(loaded playbooks: none)" in error.message


def test_error_str_names_file_line_and_key(tmp_path: Path) -> None:
    text = POLICY.replace("rate_limit: {max_actions: 3, per: 1m}", "rate_limit: {burst: 1}")
    with pytest.raises(ConfigErrors) as info:
        load_policy_set([write(tmp_path / "p.yaml", text)], [write(tmp_path / "c.yaml", PLAYBOOK)])
    assert f"{tmp_path / 'p.yaml'}:10: rate_limit.burst: unknown key 'burst'" in str(info.value)
    assert all(str(tmp_path / "p.yaml") in str(e) for e in info.value.errors)


def test_policy_set_lookups() -> None:
    policy_set = load_policy_set([REPO / "policies"], [REPO / "playbooks"])
    assert policy_set.for_signal("exec_rate") == ()
    assert isinstance(policy_set, PolicySet)
    stray = Policy(**{**policy_set.policies[0].__dict__, "playbook": "gone"})
    with pytest.raises(KeyError, match="gone"):
        policy_set.playbook_for(stray)


# --- junk never escapes as anything but ConfigErrors -------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["1s", "-1s", "fork_rate", "remedy/v1", "Policy", "Playbook", "kill"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)


def _check_only_config_errors(path: Path, text: str) -> None:
    # Lone surrogates become bytes that are not UTF-8: that path must be a ConfigError too.
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        check_paths([path])
    except ConfigErrors as err:
        assert err.errors
        assert all(isinstance(e, ConfigError) for e in err.errors)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_junk_text_only_raises_config_errors(tmp_path: Path, text: str) -> None:
    _check_only_config_errors(tmp_path / "junk.yaml", text)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([POLICY, PLAYBOOK]), st.data())
def test_mutated_documents_only_raise_config_errors(
    tmp_path: Path, base: str, data: st.DataObject
) -> None:
    document: dict[Any, Any] = yaml.safe_load(base)
    key = data.draw(st.sampled_from([*document, "extra"]))
    document[key] = data.draw(_values)
    _check_only_config_errors(tmp_path / "mutated.yaml", yaml.safe_dump(document))
