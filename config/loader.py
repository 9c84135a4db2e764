"""Strict, typed loading of ``params.yaml`` sections into dataclasses.

Every stage reads its parameters through :func:`load_section` (or :func:`build`), so that an unknown key,
a wrong type or an out-of-range value stops the stage *before any work*, with a message that names the file
and the dotted key. Constraints live beside the defaults, in the dataclass, through :func:`param`::

    @dataclass(frozen=True)
    class CrfConfig:
        iterations: int = param(10, lo=1, help="mean-field iterations")
        mode: str = param("plain", choices=("plain", "ignore_middle"))

Only stdlib + PyYAML: this module is imported by every layer, the torch-free ones included.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from models.configs import param  # noqa: F401  (the field convention this loader reads; stdlib only)
from shards.fingerprint import to_dict  # noqa: F401  (re-exported: one definition, used with the loader)

T = TypeVar("T")


class ParamsError(ValueError):
    """A params file or override that does not fit the schema; the message names file and key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# annotation -> (accepts the YAML value, what was expected, canonical form); YAML's true/false is no number here
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true/false", bool),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", int),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", float),
    str: (lambda v: isinstance(v, str), "a string", str),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the value in its canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ParamsError as exc:
                errors.append(str(exc))
        if value is None:
            raise ParamsError(f"{where}: null is not allowed here")
        raise ParamsError(errors[-1] if errors else f"{where}: {value!r} does not fit {tp}")
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where=where)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ParamsError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        accepts, what, convert = scalar
        if not accepts(value):
            raise ParamsError(f"{where}: expected {what}, got {type(value).__name__} {value!r}")
        return convert(value)
    raise ParamsError(f"{where}: unsupported annotation {_type_name(tp)}")


def _check_range(value: Any, meta: Mapping[str, Any], where: str) -> None:
    choices = meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if item not in choices:
                raise ParamsError(f"{where}: {item!r} is not one of {list(choices)}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if lo is not None and number < lo:
            raise ParamsError(f"{where}: {number!r} is below the minimum {lo}")
        if hi is not None and number > hi:
            raise ParamsError(f"{where}: {number!r} is above the maximum {hi}")


def build(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys, wrong types and out-of-range values."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ParamsError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    settable = sorted(name for name, f in fields.items() if not f.metadata.get("derived"))
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ParamsError(f"{key}: unknown key (allowed: {', '.join(settable)})")
    derived = sorted(name for name in data if fields[name].metadata.get("derived"))
    if derived:
        key = f"{where}.{derived[0]}" if where else derived[0]
        raise ParamsError(f"{key}: set by the stage from the data ({fields[derived[0]].metadata.get('help')}); "
                          "remove it")
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{key}: required key is missing")
            continue
        value = _coerce(data[name], hints[name], key)
        _check_range(value, field.metadata, key)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ParamsError(f"{where or cls.__name__}: {exc}") from None
    return obj


def _duplicate_key(text: str) -> tuple[str, int] | None:
    """The dotted path and line of the first key given twice in one mapping of ``text`` (None when there is none).

    YAML 1.2 forbids duplicate keys; PyYAML silently keeps the last value, so a second ``min_side:`` would win.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    todo: list[tuple[yaml.Node, list[str]]] = [(root, [])] if root is not None else []
    while todo:
        node, path = todo.pop(0)
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                if key in seen:
                    return ".".join([*path, key]), key_node.start_mark.line + 1
                seen.add(key)
                todo.append((value_node, [*path, key]))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((item, [*path, str(i)]) for i, item in enumerate(node.value))
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a syntax error or a key given twice names the file (and the key)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        duplicate = _duplicate_key(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if duplicate:
        raise ParamsError(f"{path}: {duplicate[0]}: key given twice (line {duplicate[1]}); give each key once")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    return data


def load(cls: type[T], path: str | Path) -> T:
    """Load a whole params file into the root dataclass ``cls``; errors name ``path`` and the dotted key."""
    data = read_yaml(path)
    try:
        return build(cls, data)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def load_section(cls: type[T], path: str | Path, section: str) -> T:
    """Load one top-level section of a params file (other sections are not checked here)."""
    data = read_yaml(path)
    try:
        return build(cls, data.get(section), where=section)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
