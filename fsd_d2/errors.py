"""The user-error types: what the entry point prints as a one-line message instead of a traceback.

Raise an :class:`FSDError` subclass only where the message names the file, row, key or value at fault and
how to fix it. Anything else (a library bug, a wrong argument in Python code) stays an ordinary exception
and keeps its traceback. Each subclass also derives from the builtin a caller would catch without knowing
FSD-D2 (``ValueError`` for bad values, ``FileNotFoundError`` for missing files).

This module imports nothing from the package, so every layer may use it.
"""
import errno
from typing import Optional

# Why a write fails for a reason outside the code: a full disk or quota, a read-only or forbidden place.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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


class StorageError(FSDError, OSError):
    """The run could not write a file (a full disk, a read-only or unwritable place); the message names the file
    and says that what was written before is kept."""


def storage_error(e: BaseException, path: Optional[str] = None) -> Optional[StorageError]:
    """The one-line :class:`StorageError` for an ``OSError`` of a full or unwritable disk writing ``path`` (else
    the error's own file name); None for any other error, which keeps its traceback."""
    if not isinstance(e, OSError) or isinstance(e, FSDError) or e.errno not in _STORAGE_ERRNOS:
        return None
    where = path or e.filename or "a file of the run"
    return StorageError(f"cannot write {where}: {e.strerror or errno.errorcode[e.errno]}. Files written before are "
                        f"kept (last_checkpoint names the last complete checkpoint): free space or choose a writable "
                        f"place (hydra.run.dir=...), then run the same command with resume=true")
