"""A record dataclass <-> a flat str -> str mapping (a Redis hash), shared by both stores.

Strings are stored as they are, numbers as decimal text (so HINCRBY works), enums by value, lists and
dicts as compact JSON; a None field is absent. Decoding follows the dataclass's type hints.
"""

from __future__ import annotations

import enum
import functools
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from aegaeon.serve.metadata.records import UPDATABLE_REQUEST_FIELDS


@functools.cache
def field_kinds(cls: type) -> dict[str, Any]:
    """Field name -> the plain type to decode to (Optional stripped, list[int] -> list)."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        kinds[name] = typing.get_origin(hint) or hint
    return kinds


def encode_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"cannot store {type(value).__name__} {value!r}")


def decode_value(kind: Any, raw: str) -> Any:
    if kind is str:
        return raw
    if kind in (int, float):
        return kind(raw)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(raw)
    return json.loads(raw)


def to_hash(record: Any) -> dict[str, str]:
    return {f.name: encode_value(v) for f in fields(record) if (v := getattr(record, f.name)) is not None}


def from_hash(cls: type, mapping: Mapping[str, str]) -> Any:
    """The dataclass from a hash; fields the hash lacks are None (or their default), extra ones ignored."""
    kinds = field_kinds(cls)
    return cls(**{name: decode_value(kinds[name], mapping[name]) for name in kinds if name in mapping})


def coerce(cls: type, name: str, value: Any) -> Any:
    """A field's value as the store gives it back (the memory store matches the Redis one exactly)."""
    return None if value is None else decode_value(field_kinds(cls)[name], encode_value(value))


def check_update(request_fields: Mapping[str, Any]) -> None:
    unknown = set(request_fields) - UPDATABLE_REQUEST_FIELDS
    if unknown:
        raise TypeError(f"update_request: no updatable field(s) {sorted(unknown)}")
