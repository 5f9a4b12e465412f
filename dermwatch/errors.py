"""One small exception hierarchy whose messages a clinic's IT person can act on.

The CLI prints ``str(error)`` as one line and exits non-zero; nothing else is shown.
"""


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
