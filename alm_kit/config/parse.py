"""Validate plain data (from YAML) into dataclasses, with errors that name file, key and choices."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union

from alm_kit.errors import AlmKitError, with_choices

T = TypeVar("T")

#: keypath -> the file (or "command line") that set it
Origins = Callable[[str], "str | None"]
#: the origin of values given as ``key.path=value`` arguments
COMMAND_LINE = "command line"
#: YAML 1.1 spellings of booleans; the recipe loader keeps them as strings (YAML 1.2), bool fields accept them
_BOOL_WORDS = {"on": True, "yes": True, "off": False, "no": False}


class ConfigError(AlmKitError):
    """A recipe value is invalid. ``str()`` names the file, the key path and what is allowed."""

    def __init__(self, message: str, *, key: str = "", source: str | None = None) -> None:
        self.key = key
        self.source = source
        #: the message without the file and key
        self.detail = message
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def parse_dataclass(cls: type[T], data: Any, *, path: str = "", origin: Origins | None = None) -> T:
    """Build ``cls`` from ``data``; unknown keys, missing keys and wrong types raise ConfigError."""
    origin = origin or (lambda _key: None)

    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(message, key=key, source=origin(key))

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise fail(f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}", path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise fail(with_choices(f"unknown key '{key}'", key, fields, "Allowed keys"), _join(path, key))
    values = {}
    for name, field in fields.items():
        key = _join(path, name)
        if name in data:
            values[name] = _convert(hints[name], data[name], key, origin)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise fail(f"missing required key '{name}' ({_type_name(hints[name])})", key)
    try:
        return cls(**values)
    except ConfigError as exc:  # a __post_init__ that validates nested entries itself (chain's steps)
        raise fail(exc.detail, _join(path, exc.key) if exc.key else path) from None
    except (ValueError, TypeError) as exc:  # __post_init__ checks
        raise fail(str(exc), _blamed_key(str(exc), data, list(fields), path, origin)) from None


def _blamed_key(message: str, given: Mapping[str, Any], fields: list[str], path: str, origin: Origins) -> str:
    """Where a ``__post_init__`` error is reported: at the field its message names. When it names
    several fields the recipe sets ("kernels and strides must have the same length"), at the one
    set last: a command-line override first, then a field from the file that set the enclosing
    mapping last (a child recipe over its parent). No field named: the enclosing mapping."""
    named = [word for word in dict.fromkeys(re.findall(r"[A-Za-z_]\w*", message)) if word in fields]
    keys = [_join(path, name) for name in named if name in given]
    if not keys:
        return _join(path, named[0]) if named else path
    for wanted in (COMMAND_LINE, origin(path)):
        for key in keys:
            if origin(key) == wanted:
                return key
    return keys[0]


def _convert(tp: Any, value: Any, key: str, origin: Origins) -> Any:
    def fail(message: str) -> ConfigError:
        return ConfigError(message, key=key, source=origin(key))

    if tp is Any:
        return value
    kind = typing.get_origin(tp)
    args = typing.get_args(tp)
    if kind in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(option, value, key, origin)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        # a mapping can only mean the one dataclass option: its own error says what is wrong
        structured = [e for o, e in zip(options, errors) if dataclasses.is_dataclass(o)]
        if isinstance(value, Mapping) and len(structured) == 1:
            raise structured[0]
        raise fail(f"expected {_type_name(tp)}, got {value!r}")
    if kind is Literal:
        if value in args:
            return value
        raise fail(with_choices(f"invalid value {value!r}", value, args, "Allowed", quote=True))
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path=key, origin=origin)
    if kind in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail(f"expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, _join(key, i), origin) for i, v in enumerate(value)]
        return tuple(items) if (kind or tp) is tuple else items
    if kind is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise fail(f"expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, _join(key, k), origin) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise fail(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail(f"expected a string, got {value!r}")
    raise fail(f"unsupported field type {_type_name(tp)}")  # pragma: no cover - schema bug
