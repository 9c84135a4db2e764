"""The schema's help texts as the comments of a params file: one description per key, kept in the schema.

``python -m pipeline params [--check] [FILE]`` rewrites the trailing comment of every key line of a params file
(``params.yaml``, a preset) with the ``help`` of its field, wrapped to continuation lines under the comment column;
block comments (a line of its own, at or left of its key's indent) are the file's own and stay. ``--check`` exits
1 when a file's comments differ from the schema's, or when it does not name every key of the schema.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Any, Iterator

COMMENT_COLUMN = 25  # where trailing comments start, unless the key and value are longer
WIDTH = 120
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<value>[^#]*?)(?P<gap> *)(?:#.*)?$")


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("derived")]


def help_texts(cls: type, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, help) of every settable key of ``cls``, nested sections included (depth first, in order)."""
    hints = _hints(cls)
    for field in _fields(cls):
        key = f"{prefix}{field.name}"
        yield key, field.metadata.get("help", "")
        if dataclasses.is_dataclass(hints[field.name]):
            yield from help_texts(hints[field.name], key + ".")


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def settable_keys(cls: type) -> list[str]:
    """Every key a params file must name: the leaves (not the section headers)."""
    hints = _hints(cls)
    keys = []
    for field in _fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys.extend(f"{field.name}.{k}" for k in settable_keys(hints[field.name]))
        else:
            keys.append(field.name)
    return keys


def _keys_of(text: str) -> Iterator[tuple[int, str, str, str]]:
    """(line index, dotted key, value text, indent) of every key line."""
    stack: list[tuple[int, str]] = []  # (indent, key)
    for i, line in enumerate(text.splitlines()):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group("key")))
        yield i, ".".join(k for _, k in stack), match.group("value").strip(), match.group("indent")


def annotate(text: str, cls: type) -> str:
    """``text`` with every key's trailing comment set to its help (unknown keys keep theirs)."""
    helps = dict(help_texts(cls))
    lines = text.splitlines()
    keys = {i: (key, value, indent) for i, key, value, indent in _keys_of(text)}
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if i not in keys or keys[i][0] not in helps or not helps[keys[i][0]]:
            out.append(line)
            i += 1
            continue
        key, value, indent = keys[i]
        head = f"{indent}{key.rsplit('.', 1)[-1]}:" + (f" {value}" if value else "")
        column = max(COMMENT_COLUMN, len(head) + 2)
        first = textwrap.wrap(helps[key], max(30, WIDTH - column - 2))[0]
        rest = helps[key][len(first):].strip()
        out.append(f"{head.ljust(column)}# {first}")
        if column > COMMENT_COLUMN + 20:  # a long value: wrapped lines go back to the usual column
            column = COMMENT_COLUMN
        out.extend(f"{' ' * column}# {part}" for part in textwrap.wrap(rest, WIDTH - column - 2))
        i += 1
        while i < len(lines) and _is_continuation(lines[i], len(indent)):  # the old wrapped comment
            i += 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _is_continuation(line: str, key_indent: int) -> bool:
    stripped = line.lstrip()
    return stripped.startswith("#") and len(line) - len(stripped) > key_indent + 2


def missing_keys(text: str, cls: type) -> list[str]:
    """Keys of the schema that ``text`` does not name."""
    named = {key for _, key, value, _ in _keys_of(text)}
    return [key for key in settable_keys(cls) if key not in named]
