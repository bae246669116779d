"""The package version (a module of its own so that low modules can read it without the package face)."""

__version__ = "0.1.0"
