"""Errors a user can fix (bad recipe, manifest, audio, checkpoint). The CLI prints them without a traceback."""


class AlmKitError(ValueError):
    """Base class: the message says which file/key/line and what is allowed."""


class AudioError(AlmKitError):
    """A clip cannot be used; the message names the file and why."""


class ManifestError(AlmKitError):
    """A manifest line is unusable; the message names the file and the line."""


class CheckpointError(AlmKitError):
    """A checkpoint directory is missing files or does not match its recipe."""


class GenerationError(AlmKitError):
    """An example cannot be answered, or generation settings are invalid (the message says which and why)."""
