"""Errors a user can fix (bad recipe, manifest, audio, checkpoint). The CLI prints them without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlmKitError(ValueError):
    """Base class: the message says which file/key/line and what is allowed."""


class AlmKitWarning(UserWarning):
    """Something a user should know that does not stop the work (a WAV cut short, repeated ids);
    the CLI prints it as one ``warning: ...`` line."""


class AudioError(AlmKitError):
    """A clip cannot be used; the message names the file and why."""


class ManifestError(AlmKitError):
    """A manifest line is unusable; the message names the file and the line."""


class CheckpointError(AlmKitError):
    """A checkpoint directory is missing files or does not match its recipe."""


class GenerationError(AlmKitError):
    """An example cannot be answered, or generation settings are invalid (the message says which and why)."""


def with_choices(message: str, value: object, valid: Iterable[object], label: str = "Valid choices",
                 *, quote: bool = False) -> str:
    """``message`` plus a did-you-mean and the valid choices, worded the same everywhere:
    "unknown projector 'mpl'; did you mean 'mlp'? Valid choices: linear, mlp" or
    "unknown projector 'x'. Valid choices: linear, mlp". ``quote`` shows the choices as ``repr``."""
    valid = list(valid)
    listed = ", ".join(repr(v) if quote else str(v) for v in valid) or "(none)"
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return f"{message}{hint} {label}: {listed}"
