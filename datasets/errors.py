"""The engine's two user-facing errors (ground floor: imports nothing of the project).

Both carry one line that says which file, row, key or value is wrong and why; the command line
prints that line and exits with code 2, never a traceback.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message is one line: which file, which row, what is wrong."""


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and why."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss...); the message is one line naming the run and step."""
