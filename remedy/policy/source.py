"""Reading YAML while remembering where every key was, so errors can name a line.

PyYAML's constructed objects forget their position; the node graph from ``compose`` keeps it in
``start_mark``. We compose once, build the plain Python value from the nodes, and record the line
of every mapping key and sequence item under its dotted path ("rate_limit.per", "steps.0.action").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from remedy.errors import ConfigError

__all__ = ["Document", "dotted", "read_documents"]


def dotted(path: tuple[object, ...]) -> str:
    """Join a key path into the dotted form used in ConfigError.key: ("steps", 0) -> "steps.0"."""
    return ".".join(str(part) for part in path)


@dataclass(frozen=True)
class Document:
    """One YAML document: its plain value and the 1-based line of each key path in it."""

    file: Path
    data: object
    lines: Mapping[str, int] = field(default_factory=dict)
    start_line: int | None = None
    # Problems that do not stop validation of the rest of the document (duplicate keys).
    problems: tuple[ConfigError, ...] = ()

    def line_of(self, key: str) -> int | None:
        """Line of ``key``, or of its nearest enclosing key that exists in the file.

        A missing key has no line of its own; the mapping that should hold it is the best pointer.
        """
        parts = key.split(".") if key else []
        while parts:
            line = self.lines.get(".".join(parts))
            if line is not None:
                return line
            parts.pop()
        return self.start_line


def _record_lines(
    file: Path, root: yaml.Node, constructor: yaml.SafeLoader
) -> tuple[dict[str, int], list[ConfigError]]:
    lines: dict[str, int] = {}
    problems: list[ConfigError] = []
    # Aliases make the node graph a DAG (or even cyclic); visiting each node once keeps a
    # "billion laughs" file from exploding here, and the first path that reaches a node is the
    # one a reader would look at anyway.
    seen: set[int] = set()
    stack: list[tuple[tuple[object, ...], yaml.Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[object] = set()
            for key_node, value_node in node.value:
                key: object = (
                    constructor.construct_object(key_node)
                    if isinstance(key_node, yaml.ScalarNode)
                    else "?"
                )
                child = (*path, key)
                line = key_node.start_mark.line + 1
                # PyYAML silently keeps the last of two equal keys; a policy edited in a hurry
                # ("threshold" twice) must not quietly use the value the author did not look at.
                if key in keys:
                    problems.append(
                        ConfigError(file, dotted(child), f"duplicate key {key!r}", line)
                    )
                keys.add(key)
                lines.setdefault(dotted(child), line)
                stack.append((child, value_node))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                lines.setdefault(dotted(child), item.start_mark.line + 1)
                stack.append((child, item))
    return lines, problems


def _yaml_error(file: Path, err: yaml.YAMLError, text: str) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(err, yaml.reader.ReaderError):
        # A control character or the like: ReaderError has a character offset instead of a mark,
        # and its str() names the "<unicode string>" we passed rather than the file.
        line = text.count("\n", 0, err.position) + 1
        char = err.character if isinstance(err.character, int) else 0
        return ConfigError(file, "", f"invalid YAML: character #x{char:04x}: {err.reason}", line)
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    if problem:
        message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    else:
        message = f"invalid YAML: {err}"
    return ConfigError(file, "", message, line)


def _is_empty(node: yaml.Node) -> bool:
    # "a: 1\n---\n" ends with an empty document (an implicit null): a separator, not content.
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null") and node.value == ""


def read_documents(file: Path) -> tuple[list[Document], ConfigError | None]:
    """Read every YAML document of ``file`` (``---`` separated), in order.

    Returns the documents read and, if the file cannot be read completely, the ConfigError that
    stopped reading (the documents before it are still returned, so their mistakes are reported
    too). Never raises for bad content: undecodable bytes, invalid YAML and YAML that PyYAML's own
    constructors choke on all come back as a ConfigError. Empty documents (a trailing ``---``)
    are skipped; a file with no document at all is an error.
    """
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return [], ConfigError(file, "", f"not UTF-8 text: {err.reason} at byte {err.start}")
    except OSError as err:
        return [], ConfigError(file, "", f"cannot read: {err.strerror or err}")

    try:
        # The constructor already scans for unprintable characters and may raise ReaderError.
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as err:
        return [], _yaml_error(file, err, text)
    documents: list[Document] = []
    start: int | None = None  # first line of the document being read, for value errors
    try:
        while loader.check_node():
            root = loader.get_node()
            if root is None or _is_empty(root):
                continue
            start = root.start_mark.line + 1
            # Line marks count from the start of the stream, so every document's lines are the
            # file's lines.
            data = loader.construct_document(root)
            lines, problems = _record_lines(file, root, loader)
            documents.append(Document(file, data, lines, start, tuple(problems)))
    except yaml.YAMLError as err:
        return documents, _yaml_error(file, err, text)
    except (ValueError, TypeError, OverflowError) as err:
        # PyYAML's implicit resolvers match things its constructors then reject without a
        # YAMLError: the timestamp "2024-13-01" raises datetime's bare ValueError. That is still
        # a problem in the file, not a crash; there is no mark, so the document's line stands in.
        return documents, ConfigError(file, "", f"invalid YAML value: {err}", start)
    except RecursionError:
        # Deeply nested flow collections ("[[[[...") exhaust the recursive composer.
        return documents, ConfigError(file, "", "invalid YAML: nested too deeply", None)
    finally:
        loader.dispose()
    if not documents:
        return [], ConfigError(file, "", "file is empty", None)
    return documents, None
