"""The process umask: what every file dermwatch writes or moves may grant, and no more.

Under the unit's ``UMask=0027`` reports, archive and quarantine are then readable by the
service's group (the doctors) and by nobody else, whatever mode a file arrived with. Started
by hand from a shell whose umask is 022 (the quick start), dermwatch still grants other users
nothing: :func:`close_to_others` runs before any command.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def close_to_others() -> None:
    """Add 007 to the process umask: no file or folder dermwatch makes is open to other users.
    Called once, single-threaded, before any command runs (the umask is per process)."""
    os.umask(os.umask(0o077) | 0o007)


@functools.cache
def process_umask() -> int:
    """Read from /proc (thread-safe); elsewhere set-and-restore once, at first use."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """The mode ``open(..., 'w')`` would give a new file under this umask."""
    return 0o666 & ~process_umask()
