"""`dermwatch run`: the long-running service loop.

Start-up order: model, database schema, folders, then recovery of interrupted work, the
observer and a first scan; only then READY=1. On SIGTERM or SIGINT the batch in hand is
finished and committed, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from dermwatch.config import Settings
from dermwatch.pipeline.process import open_processor
from dermwatch.store.queries import counts
from dermwatch.watcher.background import AlertWorker, ReportWorker
from dermwatch.watcher.notify import Notifier
from dermwatch.watcher.observer import scan, start_observer
from dermwatch.watcher.settle import SettleTracker

log = logging.getLogger(__name__)

#: Longest the loop sleeps between looks at the tracker.
TICK_SECONDS = 0.2


def run_service(settings: Settings) -> None:
    stop = threading.Event()
    _on_signals(stop)
    notifier = Notifier()
    processor = open_processor(settings)
    engine = processor.engine
    processor.recover()

    tracker = SettleTracker(settings.watcher.settle_seconds)
    observer = start_observer(settings.paths.intake, tracker, polling=settings.watcher.polling)
    found = scan(settings.paths.intake, tracker)
    log.info("watching %s (%s); %d file(s) waiting", settings.paths.intake,
             "polling" if settings.watcher.polling else "inotify", found)
    workers = [ReportWorker(settings, engine, stop)]
    if settings.alerts.channels:
        workers.append(AlertWorker(settings, engine, stop))
    for worker in workers:
        worker.start()
    notifier.send(READY="1", STATUS=f"watching {settings.paths.intake}")

    heartbeat = notifier.watchdog_interval() or 10.0
    next_scan = time.monotonic() + settings.watcher.rescan_seconds
    next_beat = 0.0
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_scan:
                scan(settings.paths.intake, tracker)
                next_scan = now + settings.watcher.rescan_seconds
            if now >= next_beat:
                for thread in (observer, *workers):
                    if not thread.is_alive():
                        raise RuntimeError(f"the {thread.name} thread died")
                notifier.send(WATCHDOG="1", STATUS=_status_line(engine, tracker))
                next_beat = now + heartbeat
            ready = tracker.take_ready(settings.model.batch_size)
            if ready:
                claimed = [c for c in map(processor.claim, ready) if c is not None]
                processor.process(claimed)
                continue
            tracker.changed.wait(TICK_SECONDS)
            tracker.changed.clear()
    finally:
        notifier.send(STOPPING="1", STATUS="stopping")
        stop.set()
        observer.stop()
        for thread in (observer, *workers):
            thread.join(timeout=30)
        notifier.close()
        engine.dispose()
    log.info("stopped")


def _status_line(engine, tracker: SettleTracker) -> str:
    totals = counts(engine)
    return (
        f"{totals['images']} images, {totals['flagged']} flagged, {totals['quarantined']} rejected, "
        f"{tracker.pending()} waiting"
    )


def _on_signals(stop: threading.Event) -> None:
    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: finishing the image in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
