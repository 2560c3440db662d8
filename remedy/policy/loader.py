"""YAML files in, one cross-checked PolicySet out, or every problem at once.

The service (``remedy run``) and ``remedy check`` both come through here, so a configuration that
passes ``check`` is exactly one the service accepts. Nothing is half-loaded: any error anywhere
rejects the whole set with a ConfigErrors listing every problem found, each located by file, dotted
key and line. A file holds one or more documents (``---`` separated); each document's ``kind:``
(Policy, Playbook, Silence, Protection) decides what it is, wherever the file is.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from remedy.actions.params import PARAMS, ActionParams
from remedy.compiler.compile import plan_problems
from remedy.errors import ConfigError, ConfigErrors
from remedy.policy.model import (
    Breaker,
    Playbook,
    Policy,
    PolicySet,
    Pressure,
    RateLimit,
    Selector,
    Silence,
    Step,
)
from remedy.policy.pressure import host_playbook_problem, pressure_of, pressure_problems
from remedy.policy.schema import (
    API_VERSION,
    KINDS,
    UNSUPPORTED_MATCH_KEYS,
    MatchDoc,
    PlaybookDoc,
    PolicyDoc,
    ProtectionDoc,
    SilenceDoc,
)
from remedy.policy.source import Document, dotted, read_documents
from remedy.sensors.catalog import SIGNALS

__all__ = ["YAML_SUFFIXES", "check_paths", "insecure", "load_policy_set"]

#: Files a directory contributes; anything else in it (READMEs, editor backups) is ignored.
YAML_SUFFIXES = (".yaml", ".yml")

_REPR_MAX = 60

_log = logging.getLogger(__name__)

# Old spellings still accepted, each with its new name; giving both in one document is an error.
_ALIASES = {"dry_run": "mode", "sustain": "for"}


#: What a host pressure policy matches: the host's records, named by the root cgroup (which no
#: cgroup offender is), so that it never takes a cgroup's records.
HOST_MATCH = Selector(cgroups=("/",))


def _host(pressure: Pressure | None) -> bool:
    return pressure is not None and pressure.scope == "host"


def _heaviest(pressure: Pressure | None) -> bool:
    return pressure is not None and pressure.offender == "heaviest"


# Pydantic speaks of Python types ("a valid dictionary or instance of StepDoc"); users wrote YAML.
_TYPE_MESSAGES = {
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
}


def load_policy_set(
    policy_paths: Sequence[Path],
    playbook_paths: Sequence[Path],
    require_secure: bool | None = None,
) -> PolicySet:
    """Load the configuration the service runs with (``remedy run``, and on SIGHUP).

    Each path is a file or a directory; a directory contributes its ``*.yaml``/``*.yml`` files in
    name order (not recursively), policy paths first. Every document's ``kind:`` decides what it is,
    so a policy and its playbook may share a file. ``require_secure`` (default: when running as
    root) refuses any file that is not owned by root or is writable by group or other, or whose
    directory is.

    Raises ConfigErrors listing every problem: unreadable or insecure files, invalid YAML,
    unknown or missing keys, bad values, a policy naming an unknown playbook, a silence naming an
    unknown policy, duplicate names, two policies for one signal with different kernel filters
    (threshold, window, for, lifetime), or no policies at all. Warnings
    (an expired silence, an old key spelling) are logged.
    """
    if require_secure is None:
        require_secure = os.geteuid() == 0
    loader = _Loader(require_secure=require_secure)
    for file in loader.expand([*policy_paths, *playbook_paths]):
        loader.load(file)
    for warning in loader.warnings:
        _log.warning("%s", warning)
    return loader.finish([*policy_paths, *playbook_paths])


def check_paths(
    paths: Sequence[Path],
    require_secure: bool = False,
    warnings: list[ConfigError] | None = None,
) -> PolicySet:
    """Validate files and directories of documents of any kind (``remedy check``).

    Exactly the validation and cross-checks of :func:`load_policy_set`: a policy whose playbook is
    not among ``paths`` is an error. ``require_secure`` defaults to False here, since CI runs
    ``remedy check`` as any user on a checkout. Problems that do not reject the configuration (an
    expired silence, an old key spelling) are appended to ``warnings`` when it is given, even when
    ConfigErrors is raised.
    """
    loader = _Loader(require_secure=require_secure)
    for file in loader.expand(paths):
        loader.load(file)
    if warnings is not None:
        warnings.extend(loader.warnings)
    return loader.finish(paths)


def insecure(path: Path) -> str | None:
    """Why root should not trust ``path`` or its directory, as a ConfigError message, or None.

    Like sshd's StrictModes: anyone who can write a policy can make remedy kill processes as
    root, so the file and its directory must be owned by root and not group- or world-writable.
    """
    target = path.resolve()
    for candidate in (target, target.parent):
        try:
            info = candidate.stat()
        except OSError as err:
            return f"cannot stat {candidate}: {err.strerror or err}"
        reasons = []
        if info.st_uid != 0:
            reasons.append(f"owned by uid {info.st_uid}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            reasons.append("writable by group or other")
        if reasons:
            return (
                f"refusing {candidate}: {' and '.join(reasons)} (like sshd, remedy only loads "
                "root-owned configuration when running as root)"
            )
    return None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``MatchDoc`` or ``list[StepDoc]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s fields by the key written in YAML (``for``, not ``for_``)."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def _model_at(model: type[BaseModel], loc: Sequence[object]) -> type[BaseModel] | None:
    """The model of the mapping at ``loc`` inside ``model`` (list indices are skipped)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        info = _keys(current).get(str(part))
        current = _submodel(info.annotation) if info is not None else None
    return current


def _known_keys(model: type[BaseModel], loc: Sequence[object]) -> list[str]:
    """Keys allowed in the mapping at ``loc`` inside ``model``."""
    current = _model_at(model, loc)
    return list(_keys(current)) if current is not None else []


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


def _message(error: Any, model: type[BaseModel], loc: Sequence[object]) -> str:
    """Turn one pydantic error into a sentence about the YAML, not about Python types."""
    kind = error["type"]
    if kind == "extra_forbidden":
        key = loc[-1] if loc else "?"
        if key in UNSUPPORTED_MATCH_KEYS and _model_at(model, loc[:-1]) is MatchDoc:
            return f"{key!r}: {UNSUPPORTED_MATCH_KEYS[str(key)]}"
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listing = f" (known keys: {', '.join(known)})" if known else ""
        return f"unknown key {key!r}{hint}{listing}"
    if kind == "missing":
        return f"missing required key {loc[-1]!r}" if loc else "missing required key"
    if kind == "value_error":
        # Our own validators raise ValueError with a finished sentence; pydantic would prefix it.
        return str(error["ctx"]["error"])
    message = _TYPE_MESSAGES.get(kind)
    if message is None:
        message = str(error["msg"]).replace("Input should be", "must be")
        message = message[:1].lower() + message[1:]
    return f"{message}, got {_describe_input(error.get('input'))}"


def _describe_input(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _describe(value)


def translate(
    doc: Document,
    err: ValidationError,
    model: type[BaseModel],
    prefix: tuple[object, ...] = (),
) -> list[ConfigError]:
    """Pydantic errors as ConfigErrors keyed by dotted path, with the line of that key."""
    found: list[ConfigError] = []
    for error in err.errors(include_url=False):
        # A bad mapping key is reported at (..., key, "[key]"); the key itself is the location.
        loc = tuple(part for part in error["loc"] if part != "[key]")
        key = dotted(prefix + loc)
        found.append(ConfigError(doc.file, key, _message(error, model, loc), doc.line_of(key)))
    return found


def _selector(spec: MatchDoc) -> Selector:
    # The validators have resolved user names to uids; the annotation still says int | str.
    return Selector(
        cgroups=tuple(spec.cgroups),
        comms=tuple(spec.comms),
        exes=tuple(spec.exes),
        cmdlines=tuple(spec.cmdlines),
        uids=tuple(uid for uid in spec.uids if isinstance(uid, int)),
        containers=tuple(spec.containers),
        pods=tuple(spec.pods),
    )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class _Loader:
    """Accumulates documents and errors over many files; ``finish`` cross-checks and decides."""

    require_secure: bool = False
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[ConfigError] = field(default_factory=list)
    policies: list[tuple[Policy, Document]] = field(default_factory=list)
    playbooks: list[tuple[Playbook, Document]] = field(default_factory=list)
    silences: list[tuple[Silence, Document]] = field(default_factory=list)
    # (name, exes, the uid they run as, document)
    protections: list[tuple[str, frozenset[str], int, Document]] = field(default_factory=list)
    # Names of documents that exist but are invalid: a policy naming a broken playbook (or a
    # silence naming a broken policy) already fails through that document's own errors, and
    # "unknown playbook" on top would send the reader astray.
    broken: dict[str, set[str]] = field(default_factory=lambda: {kind: set() for kind in KINDS})
    # A Policy document (valid or not) was found, or a file that might have held one could not
    # be read, so "no policies found" would be wrong.
    saw_policy: bool = False
    _seen_files: set[Path] = field(default_factory=set)

    def error(self, doc: Document, key: str, message: str) -> None:
        self.errors.append(ConfigError(doc.file, key, message, doc.line_of(key)))

    def expand(self, paths: Iterable[Path]) -> list[Path]:
        """The files ``paths`` stand for, each once, in the order given (directories sorted)."""
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                try:
                    found = sorted(
                        p for p in path.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file()
                    )
                except OSError as err:
                    self.errors.append(ConfigError(path, "", f"cannot list: {err.strerror}"))
                    continue
            elif path.exists():
                found = [path]
            else:
                self.errors.append(ConfigError(path, "", "no such file or directory"))
                continue
            for file in found:
                # The same file named twice (as a file and through its directory) is one file,
                # not a duplicate definition.
                resolved = file.resolve()
                if resolved not in self._seen_files:
                    self._seen_files.add(resolved)
                    files.append(file)
        return files

    def load(self, file: Path) -> None:
        """Read and validate every document of one file."""
        before = len(self.errors)
        why = insecure(file) if self.require_secure else None
        if why is not None:
            self.errors.append(ConfigError(file, "", why))
            self.saw_policy = True  # it may well have been a policy: "no policies" is noise
            return
        documents, failure = read_documents(file)
        for doc in documents:
            self.errors.extend(doc.problems)
            self._load_document(doc)
        if failure is not None:
            self.errors.append(failure)
            self.saw_policy = True
        # Within one file, report in reading order, however the validators happened to run.
        self.errors[before:] = sorted(self.errors[before:], key=lambda e: e.line or 0)

    def _load_document(self, doc: Document) -> None:
        data = doc.data
        expected = ", ".join(KINDS[:-1]) + f" or {KINDS[-1]}"
        if not isinstance(data, dict):
            got = "nothing" if data is None else type(data).__name__
            self.error(doc, "", f"expected a mapping (a {expected} document), got {got}")
            return
        if "apiVersion" not in data:
            self.error(doc, "apiVersion", f"missing required key 'apiVersion' ({API_VERSION!r})")
            return
        if data["apiVersion"] != API_VERSION:
            self.error(
                doc,
                "apiVersion",
                f"unsupported apiVersion {_describe(data['apiVersion'])}; expected {API_VERSION!r}",
            )
            return
        kind = data.get("kind")
        if kind not in KINDS:
            if "kind" not in data:
                message = f"missing required key 'kind' (expected {expected})"
            else:
                message = f"unknown kind {_describe(kind)}; expected {expected}"
            self.error(doc, "kind", message)
            return
        before = len(self.errors)
        if kind == "Policy":
            self.saw_policy = True
            self._load_policy(doc, data)
        elif kind == "Playbook":
            self._load_playbook(doc, data)
        elif kind == "Silence":
            self._load_silence(doc, data)
        else:
            self._load_protection(doc, data)
        name = data.get("name")
        if len(self.errors) > before and isinstance(name, str):
            self.broken[kind].add(name)

    def _validate(self, doc: Document, model: type[BaseModel], data: dict[Any, Any]) -> Any:
        """``data`` as ``model``, or None after recording every error."""
        try:
            return model.model_validate(data)
        except ValidationError as err:
            self.errors.extend(translate(doc, err, model))
            return None

    def _load_policy(self, doc: Document, data: dict[Any, Any]) -> None:
        both = False
        for old, new in _ALIASES.items():
            if old in data and new in data:
                both = True
                self.error(
                    doc,
                    old,
                    f"give either {new!r} or {old!r}, not both; {old!r} is the old name of {new!r}",
                )
            elif old == "sustain" and old in data:
                self.warnings.append(
                    ConfigError(
                        doc.file,
                        old,
                        "'sustain' is the old name of 'for'; rename it",
                        doc.line_of(old),
                    )
                )
        spec: PolicyDoc | None = self._validate(doc, PolicyDoc, data)
        if spec is None or both:
            return
        psi = pressure_problems(spec, data)
        for key, message in psi:
            self.error(doc, key, message)
        pressure = pressure_of(spec)
        if psi:
            return
        # offender: heaviest makes a pressure policy's offender a process, not the cgroup.
        per_cgroup = SIGNALS[spec.signal].key == "cgroup" and not _heaviest(pressure)
        if per_cgroup and not self._fits_cgroup_signal(doc, spec, data):
            return
        policy = Policy(
            name=spec.name,
            file=doc.file,
            signal=spec.signal,
            threshold=spec.threshold,
            window_s=spec.window,
            playbook=spec.playbook,
            dry_run=spec.mode == "monitor" or spec.dry_run,
            cooldown_s=spec.cooldown,
            release_after_s=spec.release_after,
            rate_limit=RateLimit(
                max_actions=spec.rate_limit.max_actions, per_s=spec.rate_limit.per
            ),
            # The host is no cgroup: its pressure records name the root, and only those.
            match=HOST_MATCH if _host(pressure) else _selector(spec.match),
            description=spec.description,
            sustain=spec.for_ if "for" in data else spec.sustain,
            lifetime_s=spec.lifetime,
            severity=spec.severity,
            # The offender of a cgroup signal is the cgroup: its scope is the cgroup.
            scope="cgroup" if per_cgroup else spec.scope,
            exclude=_selector(spec.exclude),
            breaker=Breaker(max_offenders=spec.breaker.max_offenders, per_s=spec.breaker.per),
            kernel=spec.kernel,
            pressure=pressure,
        )
        self.policies.append((policy, doc))

    def _fits_cgroup_signal(self, doc: Document, spec: PolicyDoc, data: dict[Any, Any]) -> bool:
        """A cgroup signal counts a cgroup, so its offender is the cgroup (issue 10, item 9):
        it has no process to act on alone and no comm, exe, command line or uid to select by."""
        ok = True
        if "scope" in data and spec.scope != "cgroup":
            self.error(
                doc,
                "scope",
                f"{spec.signal} counts per cgroup, so its offender is the cgroup: "
                f"scope must be cgroup (or left out), not {spec.scope}",
            )
            ok = False
        for key, selector in (("match", spec.match), ("exclude", spec.exclude)):
            for field_name in ("comms", "exes", "cmdlines", "uids"):
                if getattr(selector, field_name):
                    self.error(
                        doc,
                        f"{key}.{field_name}",
                        f"{spec.signal} counts per cgroup: a cgroup has no {field_name[:-1]}; "
                        "select it by cgroups, containers or pods",
                    )
                    ok = False
        return ok

    def _load_playbook(self, doc: Document, data: dict[Any, Any]) -> None:
        before = len(self.errors)
        spec: PlaybookDoc | None = self._validate(doc, PlaybookDoc, data)
        # Step parameters are checked on the raw data, so a mistake in one step does not hide
        # mistakes in the parameters of the others.
        steps = self._steps(doc, data.get("steps"))
        if spec is None or len(self.errors) > before:
            return
        steps = [
            dataclasses.replace(
                step,
                scope=given.scope or step.scope,
                scope_set=given.scope is not None,
                settle_s=given.settle,
                until_below=given.until.below if given.until else None,
                ttl_s=given.ttl,
                kernel=given.kernel,
            )
            for step, given in zip(steps, spec.steps, strict=True)
        ]
        self.playbooks.append((Playbook(name=spec.name, file=doc.file, steps=tuple(steps)), doc))

    def _load_silence(self, doc: Document, data: dict[Any, Any]) -> None:
        spec: SilenceDoc | None = self._validate(doc, SilenceDoc, data)
        if spec is None:
            return
        silence = Silence(
            name=spec.name,
            file=doc.file,
            match=_selector(spec.match),
            author=spec.author,
            reason=spec.reason,
            expires=spec.expires,
            policies=tuple(spec.policies),
        )
        if silence.expires <= time.time():
            # Not an error: a silence left behind after its window is harmless, and refusing the
            # whole configuration for it would block an urgent policy change.
            self.warnings.append(
                ConfigError(
                    doc.file,
                    "expires",
                    f"silence {silence.name!r} expired at {_when(silence.expires)}; "
                    "it silences nothing, remove it",
                    doc.line_of("expires"),
                )
            )
        self.silences.append((silence, doc))

    def _load_protection(self, doc: Document, data: dict[Any, Any]) -> None:
        spec: ProtectionDoc | None = self._validate(doc, ProtectionDoc, data)
        if spec is not None:
            uid = 0 if spec.user is None else int(spec.user)  # resolved by the validator
            self.protections.append((spec.name, frozenset(spec.exes), uid, doc))

    def _steps(self, doc: Document, raw: object) -> list[Step]:
        steps: list[Step] = []
        if not isinstance(raw, list):
            return steps  # PlaybookDoc has reported it
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                continue
            action = item.get("action")
            params = item.get("params", {})
            if not isinstance(action, str):
                continue
            model = PARAMS.get(action)
            if model is None:
                known = ", ".join(sorted(PARAMS))
                self.error(
                    doc,
                    f"steps.{index}.action",
                    f"unknown action {action!r}; known actions: {known}",
                )
                continue
            if not isinstance(params, dict):
                continue
            try:
                validated: ActionParams = model.model_validate(params)
            except ValidationError as err:
                self.errors.extend(translate(doc, err, model, ("steps", index, "params")))
                continue
            steps.append(Step(action=action, params=validated))
        return steps

    def _unique(self, kind: str, named: Iterable[tuple[str, Document]]) -> set[str]:
        """Report every later document reusing a ``kind`` name; return the names seen."""
        first: dict[str, Document] = {}
        for name, doc in named:
            other = first.setdefault(name, doc)
            if other is not doc:
                where = f"{other.file}:{other.line_of('name')}"
                self.error(doc, "name", f"duplicate {kind.lower()} name {name!r}; also in {where}")
        return set(first)

    def _check_cgroup_playbook(self, doc: Document, policy: Policy, playbook: Playbook) -> None:
        """Steps a cgroup offender cannot take: one process's scope, and the kernel fast path
        (it signals one forking process)."""
        for index, step in enumerate(playbook.steps):
            if step.scope_set and step.scope == "process":
                self.error(
                    doc,
                    "playbook",
                    f"{policy.signal} counts per cgroup, but step {index + 1} ({step.action}) "
                    f"of playbook {playbook.name!r} in {playbook.file} has scope process",
                )
            if step.kernel:
                self.error(
                    doc,
                    "playbook",
                    f"{policy.signal} counts per cgroup, but step {index + 1} ({step.action}) "
                    f"of playbook {playbook.name!r} in {playbook.file} arms the kernel fast "
                    "path, which signals one process",
                )

    def finish(self, searched: Sequence[Path]) -> PolicySet:
        """Cross-check everything loaded; return the set or raise ConfigErrors with all errors."""
        playbooks: dict[str, Playbook] = {}
        self._unique("Playbook", ((p.name, doc) for p, doc in self.playbooks))
        for playbook, _ in self.playbooks:
            playbooks.setdefault(playbook.name, playbook)

        names = self._unique("Policy", ((p.name, doc) for p, doc in self.policies))
        docs = {id(policy): doc for policy, doc in self.policies}
        # Limits of the kernel's tiers and window classes, with the policy's file and line.
        for problem in plan_problems(policy for policy, _ in self.policies):
            self.error(docs[id(problem.policy)], problem.key, problem.message)
        for policy, doc in self.policies:
            per_cgroup = SIGNALS[policy.signal].key == "cgroup" and not _heaviest(policy.pressure)
            if per_cgroup and policy.playbook in playbooks:
                self._check_cgroup_playbook(doc, policy, playbooks[policy.playbook])
            if policy.playbook in playbooks:
                host = host_playbook_problem(policy, playbooks[policy.playbook])
                if host is not None:
                    self.error(doc, "playbook", host)
            if policy.playbook not in playbooks and policy.playbook not in self.broken["Playbook"]:
                known = ", ".join(sorted(playbooks)) or "none"
                self.error(
                    doc,
                    "playbook",
                    f"unknown playbook {policy.playbook!r} (loaded playbooks: {known})",
                )

        self._unique("Silence", ((s.name, doc) for s, doc in self.silences))
        for silence, doc in self.silences:
            for index, name in enumerate(silence.policies):
                if name not in names and name not in self.broken["Policy"]:
                    known = ", ".join(sorted(names)) or "none"
                    self.error(
                        doc,
                        f"policies.{index}",
                        f"unknown policy {name!r} (loaded policies: {known})",
                    )

        self._unique("Protection", ((name, doc) for name, _, _, doc in self.protections))

        if not self.saw_policy:
            where = ", ".join(str(p) for p in searched) or "no paths given"
            origin = searched[0] if searched else Path()
            self.errors.append(ConfigError(origin, "", f"no policies found (looked in: {where})"))
        if self.errors:
            raise ConfigErrors(self.errors)
        # First definition wins for duplicates, which are errors anyway.
        silences: dict[str, Silence] = {}
        for silence, _ in self.silences:
            silences.setdefault(silence.name, silence)
        return PolicySet(
            policies=tuple(policy for policy, _ in self.policies),
            playbooks=MappingProxyType(playbooks),
            silences=tuple(silences.values()),
            protected_exes=frozenset().union(*(exes for _, exes, _, _ in self.protections)),
            protected_owners=MappingProxyType(self._protected_owners()),
        )

    def _protected_owners(self) -> dict[str, frozenset[int]]:
        # A path in several documents may be owned by the user of any of them.
        owners: dict[str, frozenset[int]] = {}
        for _, exes, uid, _ in self.protections:
            for exe in exes:
                owners[exe] = owners.get(exe, frozenset()) | {uid}
        return owners
