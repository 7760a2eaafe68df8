"""The user-error types: what the entry point prints as a one-line message instead of a traceback.

Raise an :class:`FSDError` subclass only where the message names the file, row, key or value at fault and
how to fix it. Anything else (a library bug, a wrong argument in Python code) stays an ordinary exception
and keeps its traceback. Each subclass also derives from the builtin a caller would catch without knowing
FSD-D2 (``ValueError`` for bad values, ``FileNotFoundError`` for missing files).

This module imports nothing from the package, so every layer may use it.
"""


class FSDError(Exception):
    """An error a user can fix from its message alone."""


class ConfigError(FSDError, ValueError):
    """A config key or value that cannot work; the message names the key and how to set it."""


class DataError(FSDError, ValueError):
    """A dataset file, CSV row or image that cannot be used; the message names it and the fix."""


class GenotypeError(FSDError, ValueError):
    """A genotype or operation pool that does not fit the search space or the model being built."""


class CheckpointError(FSDError, RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


class DivergenceError(FSDError, FloatingPointError):
    """Training produced non-finite losses or weights; the message names the iteration and the remedies."""


class MissingFileError(FSDError, FileNotFoundError):
    """A file or folder the run needs does not exist; the message says what writes or provides it."""


class ExportError(FSDError, RuntimeError):
    """An exported detector that cannot be written or disagrees with the eager model; the message says which
    file, by how much, and what to do."""
