"""alm-kit: a toolkit for small audio-language models.

Importing the package is cheap on purpose (no torch): the CLI and the plugin
registry must start fast. Heavy modules are imported where they are used.
"""

from alm_kit._version import __version__
from alm_kit.registry.hookspecs import hookimpl  # pluggy only: cheap

__all__ = ["ALM", "__version__", "hookimpl"]


def __getattr__(name: str):
    # `from alm_kit import ALM` without importing torch for everyone else
    if name == "ALM":
        from alm_kit.inference.api import ALM

        return ALM
    raise AttributeError(f"module 'alm_kit' has no attribute {name!r}")
