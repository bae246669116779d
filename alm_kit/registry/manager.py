"""Build the component registry from built-in modules and ``alm_kit`` entry points.

Design (after simonw/llm and pytest): one ``pluggy.PluginManager``, the built-in
component packages registered first as ordinary plugins, then every entry point
of the ``alm_kit`` group. A plugin that fails to import or whose hook raises is
recorded and skipped; everything else keeps working. Each registration remembers
the plugin and distribution that made it, so duplicates and ``alm-kit plugins``
can name them.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import os
import re
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from alm_kit._version import __version__
from alm_kit.errors import AlmKitError, with_choices
from alm_kit.registry import hookspecs

#: component kind -> hook that registers it
KINDS: dict[str, str] = {
    "encoder": "register_encoders",
    "fusion": "register_fusions",
    "projector": "register_projectors",
    "decoder": "register_decoders",
    "layout": "register_layouts",
}

#: built-in plugin modules; light to import (they register "module:Class" strings)
BUILTIN_PLUGINS: tuple[str, ...] = (
    "alm_kit.encoders",
    "alm_kit.fusion",
    "alm_kit.projectors",
    "alm_kit.decoders",
    "alm_kit.layouts",
)

ENTRY_POINT_GROUP = "alm_kit"
#: comma-separated entry-point names to load (unset: all; empty: none)
LOAD_PLUGINS_ENV = "ALM_KIT_LOAD_PLUGINS"
TRACE_ENV = "ALM_KIT_TRACE_PLUGINS"
#: what a string target must look like: "package.module:Class" (the attribute may be dotted)
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class Provider:
    """Who registered a component: the pluggy plugin name and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} ({self.plugin})"


@dataclass
class ComponentEntry:
    kind: str
    name: str
    target: Any  # a class, or "module:attr"
    description: str
    provider: Provider

    def load(self) -> type:
        """Import (if needed) and return the component class, checked against its kind's interface.

        Raises :class:`ComponentLoadError` (naming the component and its plugin) when a
        ``"module:Class"`` target does not import or the class is of the wrong kind.
        """
        from alm_kit.interfaces import INTERFACES

        target = self.target
        if isinstance(target, str):
            if not _TARGET.fullmatch(target):
                raise ComponentLoadError(
                    f"{self.kind} '{self.name}' from {self.provider}: target {target!r} is not 'module:Class'")
            module_name, _, attr = target.partition(":")
            try:
                target = importlib.import_module(module_name)
                for part in attr.split("."):
                    target = getattr(target, part)
            except (ImportError, AttributeError) as exc:
                raise ComponentLoadError(
                    f"{self.kind} '{self.name}' from {self.provider}: cannot import {self.target!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        base = INTERFACES[self.kind]
        if not (isinstance(target, type) and issubclass(target, base)):
            raise ComponentLoadError(
                f"{self.kind} '{self.name}' from {self.provider} is {target!r}, "
                f"which does not subclass alm_kit.interfaces.{base.__name__}"
            )
        return target

    @property
    def target_path(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{self.target.__qualname__}"


@dataclass
class PluginFailure:
    """A plugin, or one of its hooks, that registered nothing because it failed."""

    plugin: str
    distribution: str
    error: str
    traceback: str = ""
    #: the component kind whose hook failed; None: the whole plugin (it did not import)
    kind: str | None = None

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution}) failed: {self.error}"


class UnknownComponentError(AlmKitError, LookupError):
    """No component of that kind and name; the message lists the valid names and the plugins that failed."""


class DuplicateComponentError(AlmKitError, LookupError):
    """Two providers registered the same name; the message names both."""


class ComponentLoadError(AlmKitError):
    """A registered component cannot be used: its ``"module:Class"`` target does not import, or
    the class does not subclass its kind's interface. The message names the component and plugin."""


@dataclass
class Registry:
    """All registered components, by kind and name."""

    entries: dict[str, dict[str, list[ComponentEntry]]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    failures: list[PluginFailure] = field(default_factory=list)
    plugin_manager: pluggy.PluginManager | None = None

    def add(self, entry: ComponentEntry) -> None:
        self.entries[entry.kind].setdefault(entry.name, []).append(entry)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[self._check_kind(kind)])

    def __iter__(self) -> Iterable[ComponentEntry]:
        for kind in KINDS:
            for name in sorted(self.entries[kind]):
                yield from self.entries[kind][name]

    def duplicates(self) -> list[list[ComponentEntry]]:
        return [found for kind in KINDS for found in self.entries[kind].values() if len(found) > 1]

    def get(self, kind: str, name: str) -> ComponentEntry:
        found = self.entries[self._check_kind(kind)].get(name)
        if not found:
            message = unknown_message(kind, name, self.names(kind))
            failed = [f for f in self.failures if f.kind in (None, kind)]  # those that could have provided it
            if failed:
                head = "A plugin failed to load; its" if len(failed) == 1 else f"{len(failed)} plugins failed to load; their"
                message += f"\n{head} {kind}s are missing:" + "".join(f"\n  {f}" for f in failed)
            raise UnknownComponentError(message)
        if len(found) > 1:
            providers = " and ".join(f"{e.provider} -> {e.target_path}" for e in found)
            raise DuplicateComponentError(
                f"{kind} '{name}' is registered more than once: by {providers}. "
                f"Uninstall one of them, or limit plugins with {LOAD_PLUGINS_ENV}."
            )
        return found[0]

    def load(self, kind: str, name: str) -> type:
        return self.get(kind, name).load()

    @staticmethod
    def _check_kind(kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(unknown_message("component kind", kind, list(KINDS)))
        return kind


def unknown_message(what: str, name: str, valid: Iterable[str]) -> str:
    return with_choices(f"unknown {what} '{name}'", name, sorted(valid))


def _distribution_of(plugin_name: str, plugin: object, installed: dict[str, tuple[str, str]]) -> tuple[str, str]:
    if plugin_name in installed:
        return installed[plugin_name]
    module = getattr(plugin, "__name__", "") or type(plugin).__module__
    if module.split(".")[0] == "alm_kit":
        return "alm-kit", __version__
    return "(not installed)", "-"


def _make_register(collected: list[ComponentEntry], kind: str, provider: Provider):
    def register(name: str, component: Any, *, description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")
        if isinstance(component, str) and not _TARGET.fullmatch(component):
            raise TypeError(f"{kind} '{name}': {component!r} is not a 'package.module:Class' string")
        if not isinstance(component, (str, type)):
            raise TypeError(f"{kind} '{name}': register a class or a 'package.module:Class' string, "
                            f"not {type(component).__name__} {component!r}")
        if not description and not isinstance(component, str):
            description = (component.__doc__ or "").strip().split("\n")[0]
        collected.append(ComponentEntry(kind, name, component, description, provider))

    return register


def _unknown_hooks(pm: pluggy.PluginManager, registry: Registry, installed: dict[str, tuple[str, str]]) -> None:
    """A misspelled hook (``register_encoder``) would be silently ignored: report it instead."""
    hook_kinds = {hook: kind for kind, hook in KINDS.items()}
    for name, caller in vars(pm.hook).items():
        if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        close = difflib.get_close_matches(name, list(hook_kinds), n=1)
        for impl in caller.get_hookimpls():
            dist, _version = _distribution_of(impl.plugin_name, impl.plugin, installed)
            registry.failures.append(PluginFailure(
                impl.plugin_name, dist, with_choices(f"implements unknown hook '{name}'", name, hook_kinds, "Hooks"),
                kind=hook_kinds[close[0]] if close else None))


def _load_entry_points(pm: pluggy.PluginManager, registry: Registry) -> dict[str, tuple[str, str]]:
    """Register every allowed entry point; return plugin name -> (distribution, version)."""
    installed: dict[str, tuple[str, str]] = {}
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["name"] if dist is not None else "(unknown distribution)"
        if pm.get_plugin(ep.name) is not None:
            first = installed.get(ep.name, ("alm-kit", __version__))[0]
            registry.failures.append(PluginFailure(
                ep.name, dist_name, f"entry point name '{ep.name}' is already used by {first}; not loaded"))
            continue
        try:
            pm.register(ep.load(), name=ep.name)
            installed[ep.name] = (dist_name, dist.version if dist is not None else "-")
        except Exception as exc:  # a broken plugin must not break the others
            registry.failures.append(
                PluginFailure(ep.name, dist_name, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            )
    return installed


def build_registry(*, plugins: Iterable[object] = (), entry_points: bool = True) -> Registry:
    """Build a fresh registry. ``plugins`` are extra plugin objects (tests use this)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    trace = bool(os.environ.get(TRACE_ENV))
    registry = Registry(plugin_manager=pm)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    for plugin in plugins:
        pm.register(plugin)
    installed = _load_entry_points(pm, registry) if entry_points else {}
    _unknown_hooks(pm, registry, installed)

    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist, version = _distribution_of(impl.plugin_name, impl.plugin, installed)
            provider = Provider(impl.plugin_name, dist, version)
            collected: list[ComponentEntry] = []
            try:
                impl.function(register=_make_register(collected, kind, provider))
                for entry in collected:  # all or nothing: a hook that raises registers none
                    registry.add(entry)
                if trace:
                    print(f"alm-kit plugins: {impl.plugin_name}.{hook_name} registered "
                          f"{', '.join(e.name for e in collected) or 'nothing'}", file=sys.stderr)
            except Exception as exc:
                registry.failures.append(
                    PluginFailure(impl.plugin_name, dist, f"{hook_name}: {type(exc).__name__}: {exc}",
                                  traceback.format_exc(), kind=kind)
                )
    return registry


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (built on first use)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry()
    return _REGISTRY
