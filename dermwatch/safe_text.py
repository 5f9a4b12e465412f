"""Text from outside (sidecar values, file names) as every output can carry it.

A sidecar is stored as given, but a lone surrogate cannot be encoded into an HTML page, a CSV
file or an e-mail, a NUL cannot go into a command's environment, and a newline in a log line
forges another line. Escaping them where text leaves the service keeps one bad value from
taking down a day's report or an alert.
"""

from __future__ import annotations

import re

#: C0 controls and DEL; with ``keep_lines`` a tab and a newline stay (a note may have lines).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_CONTROLS_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def shown(value: str, *, keep_lines: bool = False) -> str:
    """``value`` with lone surrogates as ``\\udcXX`` and control characters as ``\\xNN``."""
    value = _SURROGATES.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    controls = _CONTROLS_BUT_LINES if keep_lines else _CONTROLS
    return controls.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
