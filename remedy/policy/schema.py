"""What a policy, playbook, silence or protection document may contain, as pydantic models.

The loader validates each YAML document against one of these and only then builds the frozen
records in :mod:`remedy.policy.model`. Models are strict (no "200" for 200, no 1 for true) and
forbid unknown keys, so a typo is an error rather than a silently ignored setting.

The same models produce the JSON Schema that ``remedy schema`` prints for editors: see
:func:`json_schema`. Validators that turn YAML spellings into values (durations, user names,
expiry dates) declare the YAML spelling for the schema with ``WithJsonSchema``.
"""

from __future__ import annotations

import pwd
import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from remedy.actions.params import PARAMS
from remedy.policy.durations import UNITS, parse_duration
from remedy.policy.model import SIGNALS, Breaker
from remedy.policy.regex import compile_cmdline

__all__ = [
    "API_VERSION",
    "DOCS",
    "KINDS",
    "BreakerDoc",
    "MatchDoc",
    "PlaybookDoc",
    "PolicyDoc",
    "PressureDoc",
    "ProtectionDoc",
    "RateLimitDoc",
    "SilenceDoc",
    "StepDoc",
    "json_schema",
]

API_VERSION = "remedy/v1"
KINDS: tuple[str, ...] = ("Policy", "Playbook", "Silence", "Protection")

#: ``match:``/``exclude:`` keys that look natural but that remedy cannot honour yet; they get
#: their own message instead of "unknown key", and are never silently accepted.
UNSUPPORTED_MATCH_KEYS: dict[str, str] = {
    "namespaces": "not supported yet: remedy cannot read Kubernetes metadata",
    "labels": "not supported yet: remedy cannot read Kubernetes metadata",
}

# The kernel stores at most TASK_COMM_LEN (16) bytes including the NUL, so a longer name can
# never equal a process's comm: reject it instead of writing a selector that never matches.
_COMM_MAX = 15
_NAME_MAX = 63
# Linux uids are 32-bit; (uid_t)-1 is "no uid" for setresuid(2) and never a real owner.
_UID_MAX = 2**32 - 2
_CONTAINER_ID = re.compile(r"[0-9a-f]{12}|[0-9a-f]{64}")
_POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _duration(value: Any) -> float:
    return parse_duration(value)


def _name(value: str) -> str:
    # Names end up in the audit log, in quarantine cgroup names and on command lines: keep them to
    # characters that are safe in all three.
    ok = (
        0 < len(value) <= _NAME_MAX
        and value[0].isascii()
        and value[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)
    )
    if not ok:
        raise ValueError(
            f"invalid name {value!r}: use 1-{_NAME_MAX} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _comm(value: str) -> str:
    if not value or len(value.encode()) > _COMM_MAX:
        raise ValueError(
            f"comm {value!r} can never match: the kernel keeps 1-{_COMM_MAX} bytes of a "
            "process name (TASK_COMM_LEN)"
        )
    return value


def _cgroup_glob(value: str) -> str:
    if not value:
        raise ValueError("empty cgroup glob; omit 'cgroups' to match any cgroup")
    return value


def _absolute_exe(value: str) -> str:
    # Anything but an exact path could be matched by a binary anyone can create and name: a
    # "sshd" substring also matches /tmp/not-sshd. Only the full path identifies the program.
    if not value.startswith("/"):
        raise ValueError(
            f"{value!r} is not an absolute path: executables are matched by exact path "
            f"(e.g. /usr/sbin/sshd), never by name or substring, which any process could imitate"
        )
    return value


def _regex(value: str) -> str:
    compile_cmdline(value)  # RegexError is a ValueError with a finished sentence
    return value


def _uid(value: int | str) -> int:
    if isinstance(value, int):
        if not 0 <= value <= _UID_MAX:
            raise ValueError(f"uid {value} is out of range (0-{_UID_MAX})")
        return value
    try:
        return pwd.getpwnam(value).pw_uid
    except (KeyError, ValueError):  # ValueError: a NUL byte in the name
        raise ValueError(
            f"unknown user {value!r} on this host; give a numeric uid or an existing user name"
        ) from None


def _container(value: str) -> str:
    if _CONTAINER_ID.fullmatch(value) is None:
        raise ValueError(
            f"container id {value!r} must be 12 or 64 lowercase hex digits "
            "(the short or full id shown by docker/crictl)"
        )
    return value


def _pod(value: str) -> str:
    if _POD_UID.fullmatch(value) is None:
        raise ValueError(
            f"pod uid {value!r} must be a lowercase UUID such as "
            "'0f8a7c2e-3b1d-4e5f-9a6b-7c8d9e0f1a2b' (metadata.uid, not the pod name)"
        )
    return value


def _expiry(value: Any) -> float:
    # A relative expiry ("2h") would mean a different moment at every reload, and a datetime
    # without a zone a different moment on every host: both are refused.
    hint = "use an ISO 8601 date and time with a timezone, e.g. 2025-06-01T18:00:00Z"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a date and time; {hint}") from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{value.isoformat()} has no timezone; {hint}")
        return value.timestamp()
    if isinstance(value, date):
        raise ValueError(f"{value.isoformat()} is a date without a time; {hint}")
    raise ValueError(f"expected a date and time, got {value!r}; {hint}")


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": rf"^\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*({'|'.join(UNITS)})?\s*$"},
    ],
    "description": "a duration: 500ms, 1s, 2.5s, 1m, 1h, or a number of seconds",
}

Name = Annotated[str, AfterValidator(_name)]
PositiveDuration = Annotated[
    float, BeforeValidator(_duration), Field(gt=0), WithJsonSchema(_DURATION_SCHEMA)
]
NonNegativeDuration = Annotated[
    float, BeforeValidator(_duration), Field(ge=0), WithJsonSchema(_DURATION_SCHEMA)
]
AbsolutePath = Annotated[
    str,
    AfterValidator(_absolute_exe),
    WithJsonSchema({"type": "string", "pattern": "^/"}),
]
Uid = Annotated[
    int | str,
    AfterValidator(_uid),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": _UID_MAX},
                {"type": "string", "minLength": 1},
            ],
            "description": "a numeric uid or a user name (resolved when loading)",
        }
    ),
]
Expiry = Annotated[
    float,
    BeforeValidator(_expiry),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "description": "ISO 8601 date and time with timezone, e.g. 2025-06-01T18:00:00Z",
        }
    ),
]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _KindDoc(_Doc):
    """What every document starts with; each kind narrows ``kind`` to its own name."""

    apiVersion: Literal["remedy/v1"]  # the key as written in YAML
    kind: str
    name: Name


class MatchDoc(_Doc):
    """``match:`` or ``exclude:`` of a policy, ``match:`` of a silence.

    Every list that is given must match (AND across keys, OR within one); all lists empty (the
    default) means every process.
    """

    cgroups: list[Annotated[str, AfterValidator(_cgroup_glob)]] = Field(default_factory=list)
    comms: list[Annotated[str, AfterValidator(_comm)]] = Field(default_factory=list)
    exes: list[AbsolutePath] = Field(default_factory=list)
    cmdlines: list[Annotated[str, AfterValidator(_regex)]] = Field(default_factory=list)
    uids: list[Uid] = Field(default_factory=list)
    containers: list[Annotated[str, AfterValidator(_container)]] = Field(default_factory=list)
    pods: list[Annotated[str, AfterValidator(_pod)]] = Field(default_factory=list)


class RateLimitDoc(_Doc):
    """``rate_limit:`` of a policy: at most ``max_actions`` actions in any ``per`` window."""

    max_actions: int = Field(default=10, ge=1)
    per: PositiveDuration = 60.0


class BreakerDoc(_Doc):
    """``breaker:`` of a policy: more than ``max_offenders`` distinct offenders acted on within
    ``per`` demotes the policy to monitor mode and raises an alert."""

    max_offenders: int = Field(default=Breaker.max_offenders, ge=1)
    per: PositiveDuration = Breaker.per_s


class PressureDoc(_Doc):
    """``pressure:`` of a pressure-signal policy (cpu_pressure, memory_pressure, io_pressure):
    the PSI trigger fires when ``stall`` time reaches ``threshold`` percent of ``window``."""

    stall: Literal["some", "full"] = "some"
    scope: Literal["cgroup", "host"] = "cgroup"
    offender: Literal["cgroup", "heaviest"] = "cgroup"


class PolicyDoc(_KindDoc):
    """A ``kind: Policy`` document."""

    kind: Literal["Policy"]
    description: str = ""
    signal: Annotated[str, WithJsonSchema({"type": "string", "enum": list(SIGNALS)})]
    threshold: int = Field(ge=1)
    window: PositiveDuration
    match: MatchDoc = Field(default_factory=MatchDoc)
    exclude: MatchDoc = Field(default_factory=MatchDoc)
    playbook: Name
    mode: Literal["enforce", "monitor"] = "enforce"
    # The old spelling of ``mode``; the loader refuses both in one document.
    dry_run: bool = Field(default=False, json_schema_extra={"deprecated": True})
    severity: Literal["info", "warning", "critical"] = "warning"
    scope: Literal["process", "tree", "cgroup"] = "process"
    cooldown: NonNegativeDuration = 5.0
    release_after: PositiveDuration = 60.0
    rate_limit: RateLimitDoc = Field(default_factory=RateLimitDoc)
    breaker: BreakerDoc = Field(default_factory=BreakerDoc)
    for_: int = Field(default=1, ge=1, le=1000, alias="for")
    # The old spelling of ``for``; the loader refuses both in one document.
    sustain: int = Field(default=1, ge=1, le=1000, json_schema_extra={"deprecated": True})
    lifetime: PositiveDuration = 0.1
    # In-kernel enforcement at the threshold: the kernel itself signals the forker on every
    # fork at or over it (fork_rate only; see remedy/compiler). None: user space decides alone.
    kernel: Literal["kill", "stop"] | None = None
    # Pressure signals only (remedy/sensors/psi.py): the loader checks the pairing.
    pressure: PressureDoc | None = None

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        if value not in SIGNALS:
            raise ValueError(f"unknown signal {value!r}; known signals: {', '.join(SIGNALS)}")
        return value

    @field_validator("release_after")
    @classmethod
    def _release_after_window(cls, value: float, info: ValidationInfo) -> float:
        # Releasing an offender before a whole window has passed would forget it while the
        # window that condemned it is still counting, so it could be "caught" afresh each time.
        window = info.data.get("window")
        if isinstance(window, float) and value <= window:
            raise ValueError(f"release_after ({value:g}s) must be longer than window ({window:g}s)")
        return value


class UntilDoc(_Doc):
    """``until:`` of a step: the offender has recovered when its signal's current window is
    below ``below`` (in the signal's unit: forks per window, percent of a core, MiB…)."""

    below: int = Field(ge=0)


class StepDoc(_Doc):
    """One entry of a playbook's ``steps:``. ``params`` are checked against the action's model
    by the loader, once ``action`` is known to exist."""

    action: Annotated[str, WithJsonSchema({"type": "string", "enum": sorted(PARAMS)})]
    params: dict[str, Any] = Field(default_factory=dict)
    scope: Literal["process", "tree", "cgroup"] | None = None
    settle: NonNegativeDuration = 0.0
    until: UntilDoc | None = None
    ttl: PositiveDuration = 3600.0
    kernel: bool = False

    @field_validator("kernel")
    @classmethod
    def _kernel_only_for_signals(cls, value: bool, info: ValidationInfo) -> bool:
        # The fast path can only deliver a signal, at the offender's next fork.
        if value and info.data.get("action") not in ("kill", "stop"):
            raise ValueError("kernel: true is only for kill and stop steps")
        return value


class PlaybookDoc(_KindDoc):
    """A ``kind: Playbook`` document."""

    kind: Literal["Playbook"]
    description: str = ""
    steps: list[StepDoc] = Field(min_length=1)


class SilenceDoc(_KindDoc):
    """A ``kind: Silence`` document: no actions on matching processes until ``expires``."""

    kind: Literal["Silence"]
    description: str = ""
    match: MatchDoc
    author: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    expires: Expiry
    policies: list[Name] = Field(default_factory=list)


class ProtectionDoc(_KindDoc):
    """A ``kind: Protection`` document: executables remedy must never act on, by exact path,
    when run as root (or as ``user``) and started by no one else (SECURITY.md)."""

    kind: Literal["Protection"]
    description: str = ""
    exes: list[AbsolutePath] = Field(min_length=1)
    # The user these daemons run as; unset: root. Never "anyone": any user can run any
    # binary they can read, and would be protected "as" it.
    user: Uid | None = None


#: The model of each ``kind:``.
DOCS: dict[str, type[_KindDoc]] = {
    "Policy": PolicyDoc,
    "Playbook": PlaybookDoc,
    "Silence": SilenceDoc,
    "Protection": ProtectionDoc,
}

_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema(kind: str | None = None) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) for one ``kind`` of document, or for any document.

    Without ``kind``, one schema whose ``oneOf`` alternatives are told apart by ``kind`` (an
    OpenAPI-style ``discriminator`` is included for editors that use it). Point an editor at it,
    e.g. with ``# yaml-language-server: $schema=remedy.schema.json`` in a policy file.
    Raises KeyError for an unknown kind.
    """
    if kind is not None:
        schema = DOCS[kind].model_json_schema(by_alias=True)
    else:
        any_doc = TypeAdapter(
            Annotated[
                PolicyDoc | PlaybookDoc | SilenceDoc | ProtectionDoc,
                Field(discriminator="kind"),
            ]
        )
        schema = any_doc.json_schema(by_alias=True)
        schema["title"] = "remedy document"
    return {"$schema": _SCHEMA_DIALECT, **schema}
