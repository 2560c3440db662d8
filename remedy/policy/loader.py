"""YAML files in, one cross-checked PolicySet out, or every problem at once.

The service (``remedy run``) and ``remedy check`` both come through here, so a configuration that
passes ``check`` is exactly one the service accepts. Nothing is half-loaded: any error anywhere
rejects the whole set with a ConfigErrors listing every problem found, each located by file, dotted
key and line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from remedy.actions.params import PARAMS, ActionParams
from remedy.errors import ConfigError, ConfigErrors
from remedy.policy.model import Playbook, Policy, PolicySet, RateLimit, Selector, Step
from remedy.policy.schema import API_VERSION, KINDS, PlaybookDoc, PolicyDoc
from remedy.policy.source import Document, dotted, read_document

__all__ = ["YAML_SUFFIXES", "check_paths", "load_policy_set"]

#: Files a directory contributes; anything else in it (READMEs, editor backups) is ignored.
YAML_SUFFIXES = (".yaml", ".yml")

_REPR_MAX = 60

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


def load_policy_set(policy_paths: Sequence[Path], playbook_paths: Sequence[Path]) -> PolicySet:
    """Load policies from ``policy_paths`` and playbooks from ``playbook_paths``.

    Each path is a file or a directory; a directory contributes its ``*.yaml``/``*.yml`` files in
    name order (not recursively). Every document under ``policy_paths`` must be a Policy and every
    one under ``playbook_paths`` a Playbook.

    Raises ConfigErrors listing every problem: unreadable files, invalid YAML, unknown or missing
    keys, bad values, a policy naming an unknown playbook, duplicate names, two policies for one
    signal, or no policies at all.
    """
    loader = _Loader()
    for file in loader.expand(policy_paths):
        loader.load(file, ("Policy",))
    for file in loader.expand(playbook_paths):
        loader.load(file, ("Playbook",))
    return loader.finish(policy_paths)


def check_paths(paths: Sequence[Path]) -> PolicySet:
    """Validate files and directories holding policies and playbooks in any mix (``remedy check``).

    Each document's ``kind:`` decides what it is. Otherwise exactly the validation and cross-checks
    of :func:`load_policy_set`: a policy whose playbook is not among ``paths`` is an error.
    """
    loader = _Loader()
    for file in loader.expand(paths):
        loader.load(file, KINDS)
    return loader.finish(paths)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``MatchDoc`` or ``list[StepDoc]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _known_keys(model: type[BaseModel], loc: Sequence[object]) -> list[str]:
    """Keys allowed in the mapping at ``loc`` inside ``model`` (list indices are skipped)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        info = current.model_fields.get(str(part))
        current = _submodel(info.annotation) if info is not None else None
    return list(current.model_fields) if current is not None else []


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


def _message(error: Any, model: type[BaseModel], loc: Sequence[object]) -> str:
    """Turn one pydantic error into a sentence about the YAML, not about Python types."""
    kind = error["type"]
    if kind == "extra_forbidden":
        key = loc[-1] if loc else "?"
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


def _translate(
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


@dataclass
class _Loader:
    """Accumulates documents and errors over many files; ``finish`` cross-checks and decides."""

    errors: list[ConfigError] = field(default_factory=list)
    policies: list[tuple[Policy, Document]] = field(default_factory=list)
    playbooks: list[tuple[Playbook, Document]] = field(default_factory=list)
    # Names of playbooks that exist but are invalid: a policy naming one already fails through
    # the playbook's own errors, and "unknown playbook" on top would send the reader astray.
    broken_playbooks: set[str] = field(default_factory=set)
    # A Policy document (valid or not) was found, so "no policies found" would be wrong.
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

    def load(self, file: Path, kinds: Sequence[str]) -> None:
        """Read and validate one file whose document must be one of ``kinds``."""
        doc = read_document(file)
        if isinstance(doc, ConfigError):
            self.errors.append(doc)
            # It may well have been a policy: "no policies found" on top would be noise.
            self.saw_policy = self.saw_policy or "Policy" in kinds
            return
        before = len(self.errors)
        self.errors.extend(doc.problems)
        self._load_document(doc, kinds)
        # Within one file, report in reading order, however the validators happened to run.
        self.errors[before:] = sorted(self.errors[before:], key=lambda e: e.line or 0)

    def _load_document(self, doc: Document, kinds: Sequence[str]) -> None:
        data = doc.data
        expected = " or ".join(kinds)
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
        if kind not in kinds:
            if "kind" not in data:
                message = f"missing required key 'kind' (expected {expected})"
            elif kind in KINDS:
                # Only load_policy_set restricts kinds: policies and playbooks have their own paths.
                message = (
                    f"expected kind {expected} here, got {kind!r}; it belongs in the other path"
                )
            else:
                message = f"unknown kind {_describe(kind)}; expected {expected}"
            self.error(doc, "kind", message)
            return
        if kind == "Policy":
            self.saw_policy = True
            self._load_policy(doc, data)
        else:
            self._load_playbook(doc, data)

    def _load_policy(self, doc: Document, data: dict[Any, Any]) -> None:
        try:
            spec = PolicyDoc.model_validate(data)
        except ValidationError as err:
            self.errors.extend(_translate(doc, err, PolicyDoc))
            return
        policy = Policy(
            name=spec.name,
            file=doc.file,
            signal=spec.signal,
            threshold=spec.threshold,
            window_s=spec.window,
            playbook=spec.playbook,
            dry_run=spec.dry_run,
            cooldown_s=spec.cooldown,
            release_after_s=spec.release_after,
            rate_limit=RateLimit(
                max_actions=spec.rate_limit.max_actions, per_s=spec.rate_limit.per
            ),
            match=Selector(cgroups=tuple(spec.match.cgroups), comms=tuple(spec.match.comms)),
            description=spec.description,
            sustain=spec.sustain,
            lifetime_s=spec.lifetime,
        )
        self.policies.append((policy, doc))

    def _load_playbook(self, doc: Document, data: dict[Any, Any]) -> None:
        before = len(self.errors)
        spec: PlaybookDoc | None = None
        try:
            spec = PlaybookDoc.model_validate(data)
        except ValidationError as err:
            self.errors.extend(_translate(doc, err, PlaybookDoc))
        # Step parameters are checked on the raw data, so a mistake in one step does not hide
        # mistakes in the parameters of the others.
        steps = self._steps(doc, data.get("steps"))
        if spec is None or len(self.errors) > before:
            name = data.get("name")
            if isinstance(name, str):
                self.broken_playbooks.add(name)
            return
        self.playbooks.append((Playbook(name=spec.name, file=doc.file, steps=tuple(steps)), doc))

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
                self.errors.extend(_translate(doc, err, model, ("steps", index, "params")))
                continue
            steps.append(Step(action=action, params=validated))
        return steps

    def finish(self, searched: Sequence[Path]) -> PolicySet:
        """Cross-check everything loaded; return the set or raise ConfigErrors with all errors."""
        playbooks: dict[str, Playbook] = {}
        for playbook, doc in self.playbooks:
            seen = playbooks.get(playbook.name)
            if seen is not None:
                self.error(
                    doc, "name", f"duplicate playbook name {playbook.name!r}; also in {seen.file}"
                )
                continue
            playbooks[playbook.name] = playbook

        names: dict[str, Policy] = {}
        by_signal: dict[str, Policy] = {}
        for policy, doc in self.policies:
            other = names.get(policy.name)
            if other is not None:
                self.error(
                    doc, "name", f"duplicate policy name {policy.name!r}; also in {other.file}"
                )
            names.setdefault(policy.name, policy)
            first = by_signal.setdefault(policy.signal, policy)
            if first is not policy:
                # The kernel filter holds a single threshold and window per signal, so a second
                # policy could never see events the first one's filter did not already pass.
                self.error(
                    doc,
                    "signal",
                    f"policy {first.name!r} in {first.file} already watches {policy.signal!r}; "
                    "only one policy per signal is supported",
                )
            if policy.playbook not in playbooks and policy.playbook not in self.broken_playbooks:
                known = ", ".join(sorted(playbooks)) or "none"
                self.error(
                    doc,
                    "playbook",
                    f"unknown playbook {policy.playbook!r} (loaded playbooks: {known})",
                )

        if not self.saw_policy:
            where = ", ".join(str(p) for p in searched) or "no paths given"
            origin = searched[0] if searched else Path()
            self.errors.append(ConfigError(origin, "", f"no policies found (looked in: {where})"))
        if self.errors:
            raise ConfigErrors(self.errors)
        return PolicySet(
            policies=tuple(policy for policy, _ in self.policies),
            playbooks=MappingProxyType(playbooks),
        )
