"""What a policy or playbook document may contain, as pydantic models.

The loader validates each YAML document against one of these and only then builds the frozen
records in :mod:`remedy.policy.model`. Models are strict (no "200" for 200, no 1 for true) and
forbid unknown keys, so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from remedy.policy.durations import parse_duration
from remedy.policy.model import SIGNALS

__all__ = [
    "API_VERSION",
    "KINDS",
    "MatchDoc",
    "PlaybookDoc",
    "PolicyDoc",
    "RateLimitDoc",
    "StepDoc",
]

API_VERSION = "remedy/v1"
KINDS: tuple[str, ...] = ("Policy", "Playbook")

# The kernel stores at most TASK_COMM_LEN (16) bytes including the NUL, so a longer name can
# never equal a process's comm: reject it instead of writing a selector that never matches.
_COMM_MAX = 15
_NAME_MAX = 63


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


Name = Annotated[str, AfterValidator(_name)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
NonNegativeDuration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MatchDoc(_Doc):
    """``match:`` of a policy. Both lists empty (the default) means every process."""

    cgroups: list[Annotated[str, AfterValidator(_cgroup_glob)]] = Field(default_factory=list)
    comms: list[Annotated[str, AfterValidator(_comm)]] = Field(default_factory=list)


class RateLimitDoc(_Doc):
    """``rate_limit:`` of a policy: at most ``max_actions`` actions in any ``per`` window."""

    max_actions: int = Field(default=10, ge=1)
    per: PositiveDuration = 60.0


class PolicyDoc(_Doc):
    """A ``kind: Policy`` document."""

    apiVersion: Literal["remedy/v1"]  # the key as written in YAML
    kind: Literal["Policy"]
    name: Name
    description: str = ""
    signal: str
    threshold: int = Field(ge=1)
    window: PositiveDuration
    match: MatchDoc = Field(default_factory=MatchDoc)
    playbook: Name
    dry_run: bool = False
    cooldown: NonNegativeDuration = 5.0
    release_after: PositiveDuration = 60.0
    rate_limit: RateLimitDoc = Field(default_factory=RateLimitDoc)
    sustain: int = Field(default=1, ge=1, le=1000)
    lifetime: PositiveDuration = 0.1

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


class StepDoc(_Doc):
    """One entry of a playbook's ``steps:``. ``params`` are checked against the action's model
    by the loader, once ``action`` is known to exist."""

    action: str
    params: dict[str, Any] = Field(default_factory=dict)


class PlaybookDoc(_Doc):
    """A ``kind: Playbook`` document."""

    apiVersion: Literal["remedy/v1"]  # the key as written in YAML
    kind: Literal["Playbook"]
    name: Name
    description: str = ""
    steps: list[StepDoc] = Field(min_length=1)
