"""Exceptions that describe a user's mistake or bad input.

The command line catches :class:`UserError` and prints its message as one line with exit
status 2, without a traceback. Anything else is a bug in this package and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake the user can fix: a bad option, a missing file, unreadable data."""


class ConfigError(UserError):
    """An unknown preset, an unknown or mistyped ``--set`` key, or an out-of-range value."""


class DataError(UserError):
    """A dataset that cannot be read: corrupt image, wrong shape, empty folder, ..."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, truncated, not ours, or for another config."""


class SamplingOptionError(ConfigError, ValueError):
    """A bad sampling option: unknown sampler or spacing, step count, eta, contradictory speed options."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DiskFullError(UserError, OSError):
    """A write that failed for lack of space (ENOSPC) or quota (EDQUOT). Also an ``OSError`` (with
    that errno), so code that handles write failures in general still catches it; its message
    names the file and the space the write needed (:mod:`ddpm.diskspace`)."""

    def __init__(self, message: str, errno: int, filename: str | None = None):
        OSError.__init__(self, errno, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message
