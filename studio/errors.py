"""User-facing errors: one clear sentence naming the problem and the fix.

Everything a user can cause (bad file, bad column, unknown model, impossible config, no GPU for
4-bit, out of memory, stop pressed) ends in a StudioError; the page and CLI show `str(err)` as is.
"""


class StudioError(Exception):
    """An error the user can act on. The message says what is wrong and how to fix it."""


class ConfigError(StudioError):
    """A run configuration that cannot work (unknown key, bad value, impossible combination)."""


class DatasetError(StudioError):
    """A dataset that cannot be read or rendered (missing file, bad row, missing column)."""


class ModelNotFoundError(StudioError):
    """A model reference that resolves to nothing on this machine."""


class OutOfMemoryError(StudioError):
    """The run needs more memory than the device has."""


class StoppedError(StudioError):
    """The user pressed Stop; what was saved stays saved."""


class BusyError(StudioError):
    """A job is already running and the studio runs one at a time."""
