"""One small exception hierarchy whose messages a clinic's IT person can act on.

The CLI prints ``str(error)`` as one line and exits non-zero; nothing else is shown.
"""

from __future__ import annotations

import errno

from sqlalchemy.exc import OperationalError

#: Errors that say the disk, not the file, is at fault: waited out, never blamed on a file.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DermwatchError(Exception):
    """Base class of every error the user is meant to read."""


class ConfigError(DermwatchError):
    """config.toml is missing, malformed, or names something unusable."""


class ModelError(DermwatchError):
    """The model file or its model card is missing, unreadable, or inconsistent."""


class DatabaseError(DermwatchError):
    """The database cannot be reached or its schema is not the one this version needs."""


class RejectedImage(DermwatchError):
    """An input file cannot be classified; the message is the reason stored with it."""


class DataError(DermwatchError):
    """Training data is missing or malformed."""


class TransientFault(DermwatchError):
    """Something outside any one file is failing for now (disk full, database locked or
    unreachable): the service waits and retries; no file is blamed for it."""


class AlreadyRunning(DermwatchError):
    """Another dermwatch service holds this installation."""


def as_transient(error: BaseException) -> TransientFault | None:
    """The passing fault ``error`` stands for (database unavailable, disk full), if it is one."""
    if isinstance(error, TransientFault):
        return error
    if isinstance(error, OperationalError):
        return TransientFault(f"database unavailable: {error.orig or error}")
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return TransientFault(f"disk full: {error.strerror} ({error.filename})")
    return None
