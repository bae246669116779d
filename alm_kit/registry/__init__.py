"""Component registry: built-in and third-party components found through pluggy."""

from alm_kit.registry.hookspecs import hookimpl
from alm_kit.registry.manager import (
    KINDS,
    ComponentEntry,
    ComponentLoadError,
    DuplicateComponentError,
    PluginFailure,
    Registry,
    UnknownComponentError,
    build_registry,
    get_registry,
)

__all__ = [
    "KINDS",
    "ComponentEntry",
    "ComponentLoadError",
    "DuplicateComponentError",
    "PluginFailure",
    "Registry",
    "UnknownComponentError",
    "build_registry",
    "get_registry",
    "hookimpl",
]
