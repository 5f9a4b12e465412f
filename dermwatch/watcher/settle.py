"""Decide when a file in the intake folder is complete enough to take.

A file is settled when no writer holds it open (inotify tells us opens and closes) and
either it was closed after writing or moved in whole, or its size and mtime have not
changed for ``settle_seconds``. Polling (network shares) only has the second rule.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Candidate:
    signature: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    stable_since: float = 0.0
    writers: int = 0
    complete: bool = False  # closed after writing, or renamed into place


class SettleTracker:
    """Thread-safe: observer threads report events, the service thread asks what is ready."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._candidates: dict[Path, _Candidate] = {}
        self._lock = threading.Lock()
        self.changed = threading.Event()  # set on every event, so the service wakes promptly

    def seen(self, path: Path) -> None:
        """A file exists or changed; it must be quiet (or closed) before it is taken."""
        with self._lock:
            candidate = self._candidates.setdefault(path, _Candidate())
            candidate.complete = False
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
            candidate.complete = False
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
            candidate.complete = True
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
                quiet = now - candidate.stable_since >= self.settle_seconds
                if candidate.writers == 0 and (candidate.complete or quiet):
                    del self._candidates[path]
                    ready.append(path)
                    if len(ready) == limit:
                        break
        return ready


def _state(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns
