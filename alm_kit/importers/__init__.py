"""Converters from other projects' checkpoints to alm-kit checkpoints (``alm-kit import KIND FILE OUT_DIR``)."""

from __future__ import annotations

from importlib import import_module

#: importer name -> "module:function"; the function takes (source, out_dir, recipe=None, overrides=())
IMPORTERS = {
    "mellow": "alm_kit.importers.mellow:import_mellow",
}


def get_importer(name: str):
    if name not in IMPORTERS:
        from alm_kit.errors import AlmKitError

        raise AlmKitError(f"unknown importer '{name}'; available: {', '.join(sorted(IMPORTERS))}")
    module, _, func = IMPORTERS[name].partition(":")
    return getattr(import_module(module), func)
