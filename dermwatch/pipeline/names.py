"""File names as they arrive: any bytes, any length; shown safely, stored losslessly.

A name from a Latin-1 client or an SMB share may not be valid UTF-8. Python carries such
bytes as lone surrogates, which neither the database nor an HTML page can hold. So a name
is stored twice: as display text with the odd bytes escaped (``caf\\xe9.jpg``), and, only
when that differs from the real name, as the exact bytes.
"""

from __future__ import annotations

import os

#: Longest file name (in bytes) that Linux file systems take.
NAME_MAX = 255


def display_name(name: str) -> str:
    """The name as valid text: bytes that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def name_bytes(name: str) -> bytes | None:
    """The exact bytes of a name that is not valid UTF-8; None for an ordinary name."""
    raw = os.fsencode(name)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return None


def fitted_name(prefix: str, name: str, limit: int = NAME_MAX) -> str:
    """``prefix + name`` as a valid, displayable file name of at most ``limit`` bytes.

    The stem is shortened (never the suffix, never mid-character) when the whole is too long.
    """
    shown = display_name(name)
    stem, dot, suffix = shown.rpartition(".")
    if not dot or len(suffix.encode()) > 16:
        stem, suffix = shown, ""
    tail = f".{suffix}" if suffix else ""
    room = limit - len(prefix.encode()) - len(tail.encode())
    short_stem = stem.encode()[:room].decode("utf-8", "ignore")
    return f"{prefix}{short_stem}{tail}"
