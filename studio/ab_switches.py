"""A/B switches: environment variables that turn one engine path off (`=0`) for a measurement, read once a process."""
from __future__ import annotations

import functools
import os


@functools.cache
def on(name: str) -> bool:
    """Whether the path that variable `name` switches is on (anything but "0"; on when unset)."""
    return os.environ.get(name, "1") != "0"
