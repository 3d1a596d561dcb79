"""Typed conversion of a raw (JSON) dict into the schema's dataclasses, collecting every problem.

Each problem names the key path, the value and what would be valid, with a did-you-mean for unknown
keys and near-miss choices. pydantic could do the conversion, but translating its messages into this
form takes as much code as the converter itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from megalite.errors import shown


def suggest(name: str, options: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest option, or ''."""
    options = [str(o) for o in options]
    if len(str(name)) > 2 * max(map(len, options), default=0):
        return ""  # nothing is close; and difflib's cost grows with the length of the name
    same_but_case = [o for o in options if o.lower() == str(name).lower()]
    close = same_but_case or difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def not_one_of(key: str, value: Any, choices: typing.Sequence[str], quote: bool = False) -> str:
    """The message for a value outside a fixed set, with a did-you-mean when one is close."""
    listed = ", ".join(map(repr, choices)) if quote else ", ".join(choices)
    hint = suggest(value, choices) if isinstance(value, str) else ""
    return f"{key}: {shown(value)} is not one of {listed}{hint}"


def type_name(tp: Any) -> str:
    """A readable name of a field's annotation for messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " | null"
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; record problems under `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            errors.append(not_one_of(key, value, choices, quote=True))
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {shown(value)}")
            return value
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, errors)
    if tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected an object, got {type(value).__name__} {shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{key}: expected an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.append(f"{key}: expected a finite number, got {shown(value)}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {shown(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in this file, not in the input


def build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from a dict, reporting unknown/missing keys and wrong types."""
    if not isinstance(raw, dict):
        errors.append(f"{prefix}: expected an object, got {type(raw).__name__} {shown(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"{prefix}.{shown(str(key), quote=False)}: unknown key{suggest(str(key), fields)}; valid: {', '.join(fields)}")
            continue
        kwargs[key] = _convert(value, hints[key], f"{prefix}.{key}", errors)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}.{name}: required key is missing ({type_name(hints[name])})")
            kwargs[name] = None
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable with errors already recorded
        errors.append(f"{prefix}: {e}")
        return None


