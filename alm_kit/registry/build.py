"""Build a component from its recipe entry (``{name, params}``): the class from the registry, the
params validated into its ``Config``. The model builds every component this way, and so does a
component that holds others (``fusion: chain`` and its steps).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Protocol

from alm_kit.config.parse import ConfigError, parse_dataclass
from alm_kit.errors import AlmKitError
from alm_kit.registry.manager import (
    ComponentLoadError,
    DuplicateComponentError,
    Registry,
    UnknownComponentError,
    get_registry,
)

if TYPE_CHECKING:  # torch is imported when a component is built, not with the registry
    from torch import nn


class ComponentSpec(Protocol):
    """A recipe entry naming a component (:class:`alm_kit.config.schema.ComponentConfig`, a chain's step)."""

    name: str
    params: dict[str, Any]


def resolve_component(kind: str, spec: ComponentSpec, key: str, *, registry: Registry | None = None,
                      origin=None) -> tuple[type, Any]:
    """The component class named by ``spec.name`` and ``spec.params`` validated into its Config.

    Errors name the recipe file and key (``model.projector.params.dropout``).
    """
    registry = registry or get_registry()
    origin = origin or (lambda _k: None)
    try:
        cls = registry.load(kind, spec.name)
    except (UnknownComponentError, DuplicateComponentError, ComponentLoadError) as exc:
        raise ConfigError(str(exc), key=f"{key}.name", source=origin(f"{key}.name")) from exc
    return cls, parse_dataclass(cls.Config, spec.params, path=f"{key}.params", origin=origin)


def build_component(kind: str, spec: ComponentSpec, key: str, *args: Any, registry: Registry | None = None,
                    origin=None, seed: int = 0) -> nn.Module:
    """Resolve and construct one component.

    Random initialisation is seeded from ``seed`` and the component's key, so a
    recipe builds the same model every time, whatever was drawn before.
    """
    import torch

    cls, config = resolve_component(kind, spec, key, registry=registry, origin=origin)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        try:
            return cls(config, *args)
        except AlmKitError:
            raise
        except ValueError as exc:  # a setting the Config alone cannot check (a token the tokenizer lacks)
            where = f"{key}.params"
            raise ConfigError(str(exc), key=where, source=(origin or (lambda _k: None))(where)) from exc
