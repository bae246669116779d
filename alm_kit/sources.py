"""What a recipe needs from outside the recipe, checked before anything is built.

Data files, checkpoint files the recipe names, hub models, downloads and packages: each component
declares what building it reads (:meth:`~alm_kit.interfaces.Component.sources`), the recipe's
``data`` and ``training.init_from`` add their files, and :func:`check_sources` looks at all of them
in well under a second: files exist, packages are installed, hub models are in the local cache or
the hub answers (one connection attempt with a short timeout, no retries; ``HF_HUB_OFFLINE=1``
means it is not asked at all), downloads are cached or their server answers. Everything missing is
reported in one message, each with the recipe key that names it and how to get it, so that
``alm-kit train`` fails in a second instead of after minutes of retries and a traceback.
Downloads that do start show their own progress bars (huggingface_hub's, openai-whisper's).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from alm_kit.errors import AlmKitError
from alm_kit.interfaces import Source, hub_or_path  # noqa: F401  (re-exported)

#: seconds one reachability check waits for a TCP connection
CONNECT_TIMEOUT = 3.0


class MissingSourcesError(AlmKitError):
    """A recipe names data, checkpoints or models this machine does not have (the message lists them)."""


def hub_offline() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def reachable(url: str) -> str | None:
    """None when ``url``'s host accepts a TCP connection, else why not (one try per host and check,
    :data:`CONNECT_TIMEOUT`)."""
    parsed = urlparse(url)
    return _connect(parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))


@cache
def _connect(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def problem(source: Source) -> str | None:
    """Why ``source`` is not available, or None when it is (or can be fetched now)."""
    if source.kind == "file":
        return None if Path(source.target).expanduser().exists() else f"{source.target} does not exist"
    if source.kind == "package":
        return None if importlib.util.find_spec(source.target) else f"the Python package {source.target} is not installed"
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.target, source.cached_as or "config.json")
        if isinstance(cached, str):
            return None
        if hub_offline():
            return f"hub model {source.target} is not in the local cache, and HF_HUB_OFFLINE is set"
        why = reachable(_hub_endpoint())
        return None if why is None else f"hub model {source.target} is not in the local cache, and {why}"
    if source.cached_as and Path(source.cached_as).exists():
        return None
    why = reachable(source.target)
    return None if why is None else f"{source.target} is not downloaded yet ({source.cached_as}), and {why}"


def recipe_sources(recipe) -> list[tuple[str, Source]]:
    """(recipe key of the component, source) for everything the recipe's components declare."""
    from alm_kit.config.loader import origin_of
    from alm_kit.model import model_entries
    from alm_kit.registry.build import resolve_component

    out = []
    for kind, spec, key in model_entries(recipe.model):
        cls, config = resolve_component(kind, spec, key, origin=lambda k: origin_of(recipe, k))
        out += [(f"{key}.params", source) for source in cls.sources(config)]
    return out


def _data_problems(recipe) -> list[str]:
    from alm_kit.data.shards import shard_paths

    data, out = recipe.data, []
    if data.synth is not None and not (data.train and Path(data.train).exists()):
        return out  # made by data.synth before training
    if not data.train:
        out.append("data.train: the recipe names no training data; set data.train=MANIFEST (docs/data.md), or "
                   "data.synth to generate the synthetic set (docs/synth.md)")
    else:
        try:
            shards = shard_paths(data.train)
        except AlmKitError as exc:
            out.append(f"{exc}; point data.train= at your shards (docs/data.md)")
        else:
            if shards is None and not Path(data.train).is_file():
                out.append(f"data.train: {data.train} does not exist; point data.train=PATH at the training "
                           "manifest (formats: docs/data.md)")
    for key in ("valid", "eval"):
        path = getattr(data, key)
        if path and not Path(path).is_file():
            what = "held-out manifest" if key == "valid" else "multiple-choice test file scored after training"
            out.append(f"data.{key}: {path} does not exist; point data.{key}=PATH at the {what}, or "
                       f"data.{key}=null to skip it (docs/recipes.md)")
    return out


def missing_sources(recipe, *, data: bool = True) -> list[str]:
    """One line per missing thing: ``key: what is missing; how to get it``. Cheap checks first."""
    lines = _data_problems(recipe) if data else []
    init = recipe.training.init_from
    if init and not Path(init).exists():
        lines.append(f"training.init_from: {init} does not exist; point it at a checkpoint or run folder")
    sources = recipe_sources(recipe)
    sources.sort(key=lambda item: ["file", "package", "hub", "download"].index(item[1].kind))  # no network first
    for key, source in sources:
        why = problem(source)
        if why is not None:
            hint = source.hint.replace("{params}", key)
            lines.append(f"{key}.{source.key}: {why}" + (f"; {hint}" if hint else ""))
    return lines


def check_sources(recipe, name: str = "the recipe", *, data: bool = True) -> None:
    """Raise :class:`MissingSourcesError` listing everything ``recipe`` needs and this machine lacks."""
    _connect.cache_clear()  # the network may have come back since the last check
    lines = missing_sources(recipe, data=data)
    if lines:
        raise MissingSourcesError(f"{name} needs what this machine does not have:\n" +
                                  "\n".join(f"  - {line}" for line in lines))
