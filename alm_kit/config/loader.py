"""Read recipe files: ``extends`` chains, deep merge, ``key.path=value`` overrides, validation."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from alm_kit.config.parse import COMMAND_LINE, ConfigError, parse_dataclass
from alm_kit.config.schema import ComponentConfig, Recipe

_BOOL_TAG = "tag:yaml.org,2002:bool"


class RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2 booleans: only ``true``/``false`` are booleans.

    PyYAML follows YAML 1.1, where ``on``/``off``/``yes``/``no`` are booleans too, so
    ``cache_features: off`` would arrive as ``False`` and fail against its choices. Here they
    stay strings; a ``bool`` field still accepts them (``parse._convert``), so the field's type
    decides what ``off`` means.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


RecipeLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse recipe text: safe (data only) and with YAML 1.2 booleans (:class:`RecipeLoader`)."""
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: data only, never code


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping at the top level, got {type(data).__name__}", source=str(path))
    return data


def _record(origins: dict[str, str], data: Any, source: str, prefix: str = "") -> None:
    origins[prefix] = source
    if isinstance(data, dict):
        for key, value in data.items():
            _record(origins, value, source, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _record(origins, value, source, f"{prefix}.{i}" if prefix else str(i))


def _component_entries(cls: type = Recipe, prefix: str = "") -> set[str]:
    """Key paths of the component entries that are not list items (``model.projector``, ...)."""
    found = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if ComponentConfig in options:
            found.add(prefix + f.name)
        for option in options:
            if dataclasses.is_dataclass(option) and option is not ComponentConfig:
                found |= _component_entries(option, f"{prefix}{f.name}.")
    return found


#: a child that gives one of these a different ``name`` replaces the parent's entry as a whole
COMPONENT_ENTRIES = frozenset(_component_entries())


def _merge(base: dict[str, Any], over: dict[str, Any], origins: dict[str, str], path: str = "") -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced, and so is a component
    entry whose ``name`` changes (the parent's ``params`` belong to the parent's component).
    The origins of what a replacement removes are forgotten."""
    out = dict(base)
    for key, value in over.items():
        where = f"{path}.{key}" if path else str(key)
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and not (
                where in COMPONENT_ENTRIES and "name" in value and value["name"] != old.get("name")):
            out[key] = _merge(old, value, origins, where)
            continue
        for stale in [k for k in origins if k.startswith(where + ".")]:
            del origins[stale]
        out[key] = value
    return out


def _resolve_file(path: Path, origins: dict[str, str], seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"'extends' forms a cycle: {chain}", source=str(path))
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    merged: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"'extends' must be a file path, got {parent!r}", key="extends", source=str(path))
        merged = _resolve_file(path.parent / parent, origins, (*seen, path))
    merged = _merge(merged, data, origins)
    _record(origins, data, str(path))
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key.path=value", source=COMMAND_LINE)
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key", source=COMMAND_LINE)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"'{part}' is not an index of this list (0..{len(node) - 1})",
                                  key=where, source=COMMAND_LINE)
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"cannot set '{text}': {'.'.join(parts[:depth])} is not a mapping",
                              key=where, source=COMMAND_LINE)


def resolve_recipe_data(path: str | Path, overrides: list[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged plain data of a recipe and, for each key path, the file that set it."""
    origins: dict[str, str] = {}
    data = _resolve_file(Path(path), origins, ())
    for text in overrides:
        parts, value = parse_override(text)
        for depth in range(1, len(parts)):  # keys the override creates come from the command line
            origins.setdefault(".".join(parts[:depth]), COMMAND_LINE)
        _apply_override(data, parts, value, text)
        _record(origins, value, COMMAND_LINE, ".".join(parts))
    return data, origins


def _origin_lookup(origins: dict[str, str]):
    def lookup(key: str) -> str | None:
        while True:
            if key in origins:
                return origins[key]
            if "." not in key:
                return origins.get("")
            key = key.rsplit(".", 1)[0]

    return lookup


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, merge and validate a recipe. Component ``params`` are checked when the model is built."""
    data, origins = resolve_recipe_data(path, overrides)
    origins.setdefault("", str(Path(path).resolve()))
    recipe = parse_dataclass(Recipe, data, origin=_origin_lookup(origins))
    recipe._origins = origins  # not a field: later checks (component params) name the right file
    return recipe


def origin_of(recipe: Recipe, key: str) -> str | None:
    """The file (or "command line") that set ``key`` in ``recipe``, when known."""
    origins = getattr(recipe, "_origins", None)
    return _origin_lookup(origins)(key) if origins else None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None, width=100)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate plain data (a checkpoint's stored recipe, a test's dict)."""
    return parse_dataclass(Recipe, data, origin=lambda _key: source)
