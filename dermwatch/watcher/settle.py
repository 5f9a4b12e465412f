"""Decide when a file in the intake folder is complete enough to take.

A file is settled when no writer holds it open (inotify tells us opens and closes) and
either it was closed after writing or moved in whole, or its size and mtime have not
changed for ``settle_seconds``. Polling (network shares) only has the second rule.

A JPEG, PNG, BMP or TIFF that is shorter than such a file says it is (a writer that reopens
and appends per chunk, a copy that pauses) is left for up to ``incomplete_seconds`` of quiet
before it is taken anyway, and then quarantined as truncated if it really is. A file renamed
into place is whole by then and is not opened to check.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, TiffImagePlugin

from dermwatch.errors import RejectedImage
from dermwatch.pipeline.regular_file import open_regular


@dataclass
class _Candidate:
    signature: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    stable_since: float = 0.0
    writers: int = 0
    complete: bool = False  # closed after writing, or renamed into place
    moved_in: bool = False  # renamed into place: whole, so not even opened to check its end
    not_before: float = 0.0  # deferred: not offered again before this (monotonic) time


class SettleTracker:
    """Thread-safe: observer threads report events, the service thread asks what is ready."""

    def __init__(self, settle_seconds: float, incomplete_seconds: float = 30.0) -> None:
        self.settle_seconds = settle_seconds
        self.incomplete_seconds = incomplete_seconds
        self._candidates: dict[Path, _Candidate] = {}
        self._lock = threading.Lock()
        self.changed = threading.Event()  # set on every event, so the service wakes promptly

    def seen(self, path: Path) -> None:
        """A file exists or changed; it must be quiet (or closed) before it is taken."""
        with self._lock:
            candidate = self._candidates.setdefault(path, _Candidate())
            candidate.complete = candidate.moved_in = False
            candidate.signature = None
        self.changed.set()

    def discovered(self, path: Path) -> None:
        """Found by a scan: track it if it is new, leave what events told us alone."""
        with self._lock:
            if path in self._candidates:
                return
            self._candidates[path] = _Candidate()
        self.changed.set()

    def opened(self, path: Path) -> None:
        with self._lock:
            candidate = self._candidates.setdefault(path, _Candidate())
            candidate.writers += 1
            candidate.complete = candidate.moved_in = False
        self.changed.set()

    def closed(self, path: Path, wrote: bool) -> None:
        with self._lock:
            candidate = self._candidates.setdefault(path, _Candidate())
            candidate.writers = max(candidate.writers - 1, 0)
            candidate.complete = candidate.complete or wrote
        self.changed.set()

    def arrived_whole(self, path: Path) -> None:
        """Renamed into the folder: its content is already complete."""
        with self._lock:
            candidate = self._candidates.setdefault(path, _Candidate())
            candidate.complete = candidate.moved_in = True
        self.changed.set()

    def defer(self, path: Path, seconds: float) -> None:
        """Offer ``path`` again, no sooner than ``seconds`` from now (a sidecar waiting for its grace)."""
        with self._lock:
            candidate = self._candidates.setdefault(path, _Candidate(complete=True))
            candidate.not_before = time.monotonic() + seconds
        self.changed.set()

    def forget(self, path: Path) -> None:
        with self._lock:
            self._candidates.pop(path, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._candidates)

    def take_ready(self, limit: int) -> list[Path]:
        """Remove and return up to ``limit`` settled files, oldest first."""
        now = time.monotonic()
        ready: list[Path] = []
        with self._lock:
            for path, candidate in list(self._candidates.items()):
                state = _state(path)
                if state is None:  # vanished, or no longer a file we may take
                    del self._candidates[path]
                    continue
                if state != candidate.signature:
                    candidate.signature, candidate.stable_since = state, now
                if now < candidate.not_before or candidate.writers:
                    continue
                quiet_for = now - candidate.stable_since
                if (candidate.complete or quiet_for >= self.settle_seconds) and (
                    candidate.moved_in or quiet_for >= self.incomplete_seconds or looks_whole(path)
                ):
                    del self._candidates[path]
                    ready.append(path)
                    if len(ready) == limit:
                        break
        return ready


def _state(path: Path) -> tuple[int, int] | None:
    """(size, mtime); None when gone. A file the service may not even stat is still offered:
    taking it then fails, and that failure is recorded for the file."""
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, -1)
    return stat.st_size, stat.st_mtime_ns


_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
_BMP_START = b"BM"  # then the file's length, 4 bytes little-endian
_TIFF_STARTS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # little/big-endian, classic/BigTIFF
#: Where a TIFF's first image keeps its pixels, and how many bytes each piece has: strips or tiles.
_TIFF_PIECES = ((TiffImagePlugin.STRIPOFFSETS, TiffImagePlugin.STRIPBYTECOUNTS),
                (TiffImagePlugin.TILEOFFSETS, TiffImagePlugin.TILEBYTECOUNTS))


def looks_whole(path: Path) -> bool:
    """False for a JPEG or PNG whose last bytes are not its format's end marker, and for a BMP
    or TIFF shorter than its header says: still being written.

    Cheap (a few bytes at each end; a TIFF's directory). Anything else, or a file that cannot
    be read, is left to the decoder to judge; so is a link, a FIFO or a device, which is never
    opened blocking or followed here.
    """
    try:
        with open_regular(path) as handle:
            start = handle.read(8)
            size = handle.seek(0, os.SEEK_END)
            if size < 16:
                return True
            if start.startswith(_TIFF_STARTS):
                handle.seek(0)
                return _tiff_pixels_within(handle, size)
            handle.seek(-8, os.SEEK_END)
            end = handle.read(8)
    except (OSError, RejectedImage):
        return True
    if start.startswith(_JPEG_START):
        return end.endswith(_JPEG_END)
    if start == _PNG_START:
        return end == _PNG_END
    if start.startswith(_BMP_START):
        return size >= int.from_bytes(start[2:6], "little")
    return True


def _tiff_pixels_within(handle: BinaryIO, size: int) -> bool:
    """Whether a TIFF's first image lies within its first ``size`` bytes. Writers put the
    directory before or after the pixels, so a file cut short lacks one or the other."""
    try:
        # Pillow warns of each short read; the answer here says as much.
        with warnings.catch_warnings(action="ignore"), Image.open(handle, formats=["TIFF"]) as image:
            tags = image.tag_v2
            pieces = next(((tags[offsets], tags[counts]) for offsets, counts in _TIFF_PIECES
                           if offsets in tags and counts in tags), None)
    except (OSError, SyntaxError, ValueError, EOFError):  # UnidentifiedImageError is an OSError
        return False
    if pieces is None:
        return True  # nothing to measure: the decoder judges
    offsets, counts = (piece if isinstance(piece, tuple) else (piece,) for piece in pieces)
    return max(offset + count for offset, count in zip(offsets, counts, strict=False)) <= size
