"""Logging to stderr; under systemd, with the journal's priority on every line.

journald reads a ``<N>`` prefix as the line's priority, so `journalctl -p err` then finds
dermwatch's errors. The prefix is used only when stderr really is the journal stream
(systemd's JOURNAL_STREAM names its device and inode), never on a terminal.
"""

from __future__ import annotations

import logging
import os
import sys

from dermwatch.safe_text import shown

#: syslog priorities journald understands.
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


class OneLine(logging.Filter):
    """A message is one line: a file name with a newline in it cannot forge another log line.
    (A traceback, which comes from the code and not from a file, keeps its lines.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = shown(record.getMessage()), ()
        return True


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(OneLine())
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))  # journald adds time and level
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


def stderr_is_journal() -> bool:
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"
