"""Command-line regexes run on RE2: linear in the command line, and refused when they need
backtracking (issue 11, item 5)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from remedy.cli import main
from remedy.errors import ConfigErrors
from remedy.policy import Facts, RegexError, Selector, Silence, check_paths
from remedy.service.control import silence_from_request
from remedy.status import ControlError

# Exponential for a backtracking engine: each of the 255 letters can end a group or not, and
# the final "!" makes every split fail. Python's re needs ~1 s at 24 characters, x4 per 2 more.
PATHOLOGICAL = r"^(\w+\s?)+$"
HOSTILE_CMDLINE = "a" * 255 + "!"  # CMDLINE_MAX (remedy.sensors.context) characters

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


def _conf(tmp_path: Path, policy: str) -> Path:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "a.yaml").write_text(textwrap.dedent(policy))
    (conf / "b.yaml").write_text(PLAYBOOK)
    return conf


def _facts(cmdline: str) -> Facts:
    return Facts(cgroup="/user.slice", comm="sh", cmdline=cmdline)


def _decided_in(selector: Selector, cmdline: str) -> tuple[bool, float]:
    start = time.perf_counter()
    matched = selector.matches(_facts(cmdline))
    return matched, time.perf_counter() - start


@pytest.mark.timeout(20)  # a backtracking engine would run for ages: fail, do not hang CI
def test_pathological_pattern_is_decided_in_linear_time(tmp_path: Path) -> None:
    conf = _conf(tmp_path, POLICY + f"exclude: {{cmdlines: ['{PATHOLOGICAL}']}}\n")
    (policy,) = check_paths([conf]).policies
    start = time.perf_counter()
    why = policy.applies_to(_facts(HOSTILE_CMDLINE))
    elapsed = time.perf_counter() - start
    print(f"{PATHOLOGICAL!r} against {len(HOSTILE_CMDLINE)} characters: {elapsed * 1e3:.3f} ms")
    assert why is None  # not excluded: the pattern does not match
    assert elapsed < 0.5
    # And still a regex: the same pattern matches a command line it should.
    assert policy.applies_to(_facts("make all install")) == "excluded by exclude:"


@pytest.mark.timeout(20)
def test_a_silence_from_the_control_socket_is_linear_too() -> None:
    silence = silence_from_request(
        {
            "name": "deploy",
            "author": "ana",
            "reason": "rollout",
            "expires": "2999-01-01T00:00:00Z",
            "match": {"cmdlines": [PATHOLOGICAL]},
        }
    )
    start = time.perf_counter()
    applies = silence.applies("fork-bomb", _facts(HOSTILE_CMDLINE), now_wall=0.0)
    elapsed = time.perf_counter() - start
    print(f"silence decided in {elapsed * 1e3:.3f} ms")
    assert not applies
    assert elapsed < 0.5
    assert silence.applies("fork-bomb", _facts("deploy step one"), now_wall=0.0)


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        (r"(a)\1", "backreferences (\\1)"),
        ("(?P<x>a)(?P=x)", "backreferences"),
        ("--worker(?=-)", "lookahead"),
        ("(?!sshd)", "negative lookahead"),
        ("(?<=python3 )manage", "lookbehind"),
        ("(?<!x)y", "lookbehind"),
        ("(?>a+)b", "atomic groups"),
        ("a++", "possessive"),
        (r"worker\Z", r"write \z"),
        (r"\pL{1000}", "memory budget"),
    ],
)
def test_backtracking_features_are_refused_at_load(
    tmp_path: Path, pattern: str, needle: str
) -> None:
    text = POLICY + "match:\n  cmdlines:\n    - ok\n    - '" + pattern.replace("'", "''") + "'\n"
    with pytest.raises(ConfigErrors) as info:
        check_paths([_conf(tmp_path, text)])
    (error,) = info.value.errors
    assert (error.file.name, error.line, error.key) == ("a.yaml", 11, "match.cmdlines.1")
    assert needle in error.message
    assert f"invalid regular expression {pattern!r}" in error.message


def test_remedy_check_shows_the_refused_pattern_with_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = _conf(tmp_path, POLICY + "exclude: {cmdlines: ['(?<!-)sshd']}\n")
    assert main(["check", str(conf)]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"{conf / 'a.yaml'}:8: exclude.cmdlines.0: invalid regular expression" in text
    assert "lookbehind" in text
    assert "RE2" in text


def test_a_silence_file_and_a_control_silence_refuse_alike(tmp_path: Path) -> None:
    silence = textwrap.dedent(
        """\
        apiVersion: remedy/v1
        kind: Silence
        name: db
        match: {cmdlines: ['(\\w+)-\\1']}
        author: alice
        reason: migration
        expires: 2999-01-01T00:00:00Z
        """
    )
    conf = _conf(tmp_path, POLICY + "---\n" + silence)
    with pytest.raises(ConfigErrors) as info:
        check_paths([conf])
    (error,) = info.value.errors
    assert (error.key, error.line) == ("match.cmdlines.0", 12)
    with pytest.raises(ControlError, match=r"match\.cmdlines\.0: invalid regular expression"):
        silence_from_request(
            {
                "name": "x",
                "author": "a",
                "reason": "r",
                "expires": "2999-01-01T00:00:00Z",
                "match": {"cmdlines": ["(?=a)"]},
            }
        )


def test_a_selector_never_holds_a_pattern_it_cannot_run() -> None:
    # Whatever builds one (loader, control socket, explain, a test), a refused pattern fails
    # when the selector is built, never at the first decision.
    with pytest.raises(RegexError, match="lookahead"):
        Selector(cmdlines=("(?=x)",))
    with pytest.raises(RegexError):
        Silence(
            name="s",
            file=Path("<test>"),
            match=Selector(cmdlines=("\udcff",)),  # a lone surrogate is no UTF-8 pattern
            author="a",
            reason="r",
            expires=2e9,
        )


def test_a_command_line_that_is_not_utf8_is_matched_not_crashed_on() -> None:
    # remedy.proc decodes argv with surrogateescape: b"\xff" arrives as "\udcff". The offender
    # chooses its bytes; they must never raise inside a decision.
    hostile = b"/opt/app --worker \xff\xfe".decode("utf-8", "surrogateescape")
    assert Selector(cmdlines=(r"--worker\b",)).matches(_facts(hostile))
    assert not Selector(cmdlines=("^x",)).matches(_facts(hostile))
    assert Selector(cmdlines=("worker .",)).matches(_facts("--worker é"))  # one character


@pytest.mark.parametrize(
    ("pattern", "cmdline", "expected"),
    [
        (r"--worker\b", "gunicorn --worker 3", True),
        (r"--worker\b", "gunicorn --workers 3", False),
        (r"^python3 .*manage\.py", "python3 -X dev manage.py migrate", True),
        (r"^python3 .*manage\.py", "/usr/bin/python3 manage.py", False),
        ("(?i)MAKE", "make -j8", True),
        (r"\d{3,}", "sleep 1000", True),
        ("a|b", "ccc", False),
        # Documented: RE2's \w is ASCII; [\pL\pN_] is the any-script spelling.
        (r"^\w+$", "café", False),
        (r"^[\pL\pN_]+$", "café", True),
    ],
)
def test_ordinary_patterns_keep_their_meaning(pattern: str, cmdline: str, expected: bool) -> None:
    assert Selector(cmdlines=(pattern,)).matches(_facts(cmdline)) is expected
