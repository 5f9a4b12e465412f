"""watchdog events and periodic scans -> the settle tracker."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from dermwatch.pipeline.claim import is_taken, iter_candidates
from dermwatch.pipeline.names import display_name
from dermwatch.watcher.settle import SettleTracker

#: The events the tracker learns from; the rest (folder changes among them) are not even dispatched.
HANDLED_EVENTS = [FileMovedEvent, FileOpenedEvent, FileClosedEvent, FileClosedNoWriteEvent, FileCreatedEvent,
                  FileModifiedEvent]


class IntakeHandler(FileSystemEventHandler):
    """Reports every event on a candidate file to the tracker; ignores everything else."""

    def __init__(self, tracker: SettleTracker) -> None:
        self.tracker = tracker

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self._if_candidate(event.src_path, self.tracker.forget)
            self._if_candidate(event.dest_path, self.tracker.arrived_whole)
        elif isinstance(event, FileOpenedEvent):
            self._if_candidate(event.src_path, self.tracker.opened)
        elif isinstance(event, FileClosedEvent):
            self._if_candidate(event.src_path, lambda p: self.tracker.closed(p, wrote=True))
        elif isinstance(event, FileClosedNoWriteEvent):
            self._if_candidate(event.src_path, lambda p: self.tracker.closed(p, wrote=False))
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self._if_candidate(event.src_path, self.tracker.seen)

    @staticmethod
    def _if_candidate(raw: str | bytes, action) -> None:
        if not raw:  # the outside end of a move into or out of the intake folder
            return
        path = Path(os.fsdecode(raw))
        if is_taken(path.name):
            action(path)


def start_observer(intake: Path, tracker: SettleTracker, *, polling: bool, poll_seconds: float = 1.0) -> BaseObserver:
    """Watch ``intake`` recursively; inotify by default, stat polling for network shares."""
    observer: BaseObserver = PollingObserver(timeout=poll_seconds) if polling else _event_observer()
    observer.schedule(IntakeHandler(tracker), str(intake), recursive=True, event_filter=HANDLED_EVENTS)
    observer.daemon = True
    observer.start()
    return observer


def _event_observer() -> BaseObserver:
    """inotify on Linux (see :func:`_arrivals_observer`), the platform's own observer elsewhere."""
    try:
        return _arrivals_observer()
    except ImportError:
        return Observer()


def _arrivals_observer() -> BaseObserver:
    """inotify with full move events, told only of what comes into the intake folder.

    A file renamed in from outside is then a move (whole at once, taken at once), not a
    creation that must first be quiet for settle_seconds. Files leaving (the service's own
    claims, one per image) are not subscribed to: the tracker drops a candidate that is gone
    when it next looks (``SettleTracker.take_ready``), and watchdog holds every departure for
    half a second to pair it, searching those it holds on every arrival. With 400 photos
    landing at once that search cost 0.46 ms of CPU per image (bench/throughput.py).
    """
    from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyConstants, Mask

    class ArrivalsEmitter(InotifyFullEmitter):
        def get_event_mask_from_filter(self) -> Mask:
            return Mask(super().get_event_mask_from_filter() & ~InotifyConstants.IN_MOVED_FROM)

    observer = InotifyObserver(generate_full_events=True)
    observer._emitter_class = ArrivalsEmitter  # noqa: SLF001 - watchdog takes no emitter argument here
    return observer


@dataclass
class ScanResult:
    found: int = 0  # images and sidecars under intake
    unlistable: dict[str, str] = field(default_factory=dict)  # folder the service may not list -> why

    def fault(self) -> str | None:
        """For `status`: files in these folders are not taken until someone mends their rights."""
        if not self.unlistable:
            return None
        folders = "; ".join(f"{folder} ({why})" for folder, why in sorted(self.unlistable.items()))
        return f"cannot look into {folders}: files there are not taken until the service's user may list and " \
               "write the folder"


def scan(intake: Path, tracker: SettleTracker) -> ScanResult:
    """Report every image and sidecar under ``intake`` to the tracker, and the subfolders it may
    not list (not skipped in silence)."""
    result = ScanResult()

    def unlistable(error: OSError) -> None:
        result.unlistable[display_name(str(error.filename))] = error.strerror or type(error).__name__

    for path in iter_candidates(intake, sidecars=True, on_error=unlistable):
        tracker.discovered(path)
        result.found += 1
    return result
