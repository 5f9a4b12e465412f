"""Open a file from intake only if it is a regular file, and never block or follow a link doing so.

A FIFO named ``x.jpg`` would block a plain ``open()`` until someone writes to it, and a link
would be read (or chmod-ed) through to whatever it points at. O_NOFOLLOW refuses a link,
O_NONBLOCK keeps a FIFO from blocking, and fstat on what was opened (not a path looked at
earlier) tells a regular file from the rest.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from dermwatch.errors import RejectedImage


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading; RejectedImage naming what it is when it is no regular file."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RejectedImage("symbolic links are refused: copy the image itself into the intake folder") from None
        raise
    kind = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(kind):
        os.close(descriptor)
        raise RejectedImage(f"not a regular file ({_kind_name(kind)}): only image files are taken")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "of an unknown kind"
