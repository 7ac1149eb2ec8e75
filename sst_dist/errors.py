"""The mistakes a user can make and fix, each reported as one line (sst_dist.cli) rather than a
traceback. Raised early, where the bad key, file or folder is first seen."""

from __future__ import annotations


class ConfigError(ValueError):
    """A mistake in a recipe or on the command line; the message is one line for the user."""


class DataError(Exception):
    """A data problem the user can fix; the message is one line naming the file or recipe key."""


class RunError(RuntimeError):
    """A problem with the output folder, its checkpoints or the run's progress; the message is one
    line for the user."""
