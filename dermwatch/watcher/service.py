"""`dermwatch run`: the long-running service loop.

Start-up order: the settings checked (model, database URL, intake), the installation's lock,
folders, database schema, model, the observer and a first scan, then READY=1; arrivals an
interrupted run left in state/work/ are finished first. On SIGTERM or SIGINT the batch in
hand is finished and committed, and the process exits 0. A new model file or SIGHUP makes
it finish the same way and start over with the new model and settings (watcher/reload.py).

Nothing that happens to one file, and no passing fault (full disk, locked or unreachable
database), ends the loop: a file's fault is that file's fate, and a passing fault leaves the
arrivals in hand in state/work/ and is retried with back-off, shown in STATUS= meanwhile.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from sqlalchemy import Engine

from dermwatch.config import Settings
from dermwatch.errors import TransientFault, as_transient
from dermwatch.pipeline.claim import Claimed, is_sidecar
from dermwatch.pipeline.late_sidecar import settle_sidecar
from dermwatch.pipeline.process import Processor, check_settings, open_processor
from dermwatch.pipeline.workers import LeaseLost, Membership, beat_seconds, cooperative
from dermwatch.store.db import make_engine
from dermwatch.store.queries import counts
from dermwatch.watcher.background import AlertWorker, ReportWorker
from dermwatch.watcher.health import STATUS_FILE, Backoff, Health, StallWatch, worker_status_file
from dermwatch.watcher.instance import InstanceLock
from dermwatch.watcher.notify import Notifier
from dermwatch.watcher.observer import scan, start_observer
from dermwatch.watcher.reload import Reload
from dermwatch.watcher.settle import SettleTracker

log = logging.getLogger(__name__)

#: Longest a step keeps taking newly settled files. The lanes classify while the step claims
#: and stores, so a long step keeps them busy through a burst; the loop beats and scans
#: between steps.
STEP_SECONDS = 5.0
#: Longest the loop sleeps between looks at the tracker.
TICK_SECONDS = 0.2
#: How long a step waits for the next file to settle before it ends. Ending a step drains the
#: lanes (its last batch is stored while they idle), so a step should not end in the middle
#: of a burst merely because the observer's events come a moment later than the files.
LINGER_SECONDS = 0.1
#: How long the intake must have had nothing to take before the spare claim folders are
#: removed (pipeline/claim.py, ClaimFolders): a burst has gaps while the observer catches up.
TIDY_AFTER_SECONDS = 2.0
#: How soon a sidecar waiting for its image (or its grace period) is looked at again.
SIDECAR_RECHECK_SECONDS = 1.0
#: The STATUS= counts wait at most this long for a locked database: the heartbeat that
#: carries them must reach systemd's watchdog whatever the database does.
STATUS_BUSY_TIMEOUT_SECONDS = 1.0


def run_service(settings: Settings, reread: Callable[[], Settings], *, create_intake: bool = False) -> None:
    """Run until SIGTERM or SIGINT, starting over (same process) whenever a new model or SIGHUP
    brings new settings; ``reread`` reads the configuration again."""
    check_settings(settings, create_intake=create_intake)
    while settings is not None:
        settings = _run_once(settings, reread)


def _run_once(settings: Settings, reread: Callable[[], Settings]) -> Settings | None:
    """One run on ``settings`` (already checked); the settings to start over with, or None."""
    stop = threading.Event()
    reload = Reload(settings, reread)  # before the model is loaded: a change from then on is seen
    _on_signals(stop, reload.requested)
    # SQLite: one service per installation. PostgreSQL: any number of workers, each in its own
    # state/work/ folder (pipeline/workers.py).
    lock = None if cooperative(settings.database_url) else InstanceLock(settings)
    notifier = Notifier()
    processor = _open_when_reachable(settings, notifier, stop)
    if processor is None:  # stopped while waiting for the database
        notifier.close()
        if lock is not None:
            lock.release()
        return None
    membership = processor.membership
    health = Health(worker_status_file(membership.id) if membership else STATUS_FILE, processor.card.display)
    intake = Intake(settings, processor, health, stop)
    status_engine = make_engine(settings.database_url, STATUS_BUSY_TIMEOUT_SECONDS)

    observer = start_observer(settings.paths.intake, intake.tracker, polling=settings.watcher.polling)
    found = intake.scan()
    log.info("watching %s (%s); %d file(s) waiting", settings.paths.intake,
             "polling" if settings.watcher.polling else "inotify", found)
    workers = [ReportWorker(settings, processor.engine, processor.lanes, stop, health)]
    if settings.alerts.channels:
        workers.append(AlertWorker(settings, processor.engine, stop, health))
    if membership is None:
        for worker in workers:
            worker.start()
    stall_watch = StallWatch(health, settings.paths.state, stop, lambda: processor.doing)
    stall_watch.start()
    notifier.send(READY="1", STATUS=f"watching {settings.paths.intake}")

    heartbeat = min(notifier.watchdog_interval() or 10.0, beat_seconds(settings.worker_lease_seconds))
    next_scan = time.monotonic() + settings.watcher.rescan_seconds
    next_beat = 0.0
    start_over: Settings | None = None
    try:
        while not stop.is_set():
            now = health.looped_at = time.monotonic()
            if now >= next_scan:
                intake.scan()
                next_scan = now + settings.watcher.rescan_seconds
            if now >= next_beat:
                for thread in (observer, *(w for w in workers if w.ident is not None)):
                    if not thread.is_alive():
                        raise RuntimeError(f"the {thread.name} thread died")
                if membership is not None:
                    _cooperate(membership, intake, workers, health)
                line = _status_line(status_engine, intake, health)
                notifier.send(WATCHDOG="1", STATUS=line)
                health.publish(settings.paths.state, line)
                next_beat = now + heartbeat
                start_over = reload.due(health)
                if start_over is not None:
                    log.info("%s: finishing the image in hand, then starting over", reload.reason)
                    break
            # A step ends in time for the next heartbeat: a worker busy with a burst must
            # still renew its lease, or another would take over the files in its hands.
            if intake.step(until=min(next_beat, now + STEP_SECONDS)):
                continue
            intake.tracker.changed.wait(TICK_SECONDS)
            intake.tracker.changed.clear()
    finally:
        if start_over is None:
            notifier.send(STOPPING="1", STATUS="stopping")
        else:  # READY=1 comes again from the next run
            notifier.send(RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000),
                          STATUS=f"starting over: {reload.reason}")
        stop.set()
        observer.stop()
        for thread in (observer, stall_watch, *(w for w in workers if w.ident is not None)):
            thread.join(timeout=30)
        health.publish(settings.paths.state, "stopped")
        health.close()
        processor.tidy()
        if membership is not None:
            _guarded_leave(membership)
            (settings.paths.state / health.status_file).unlink(missing_ok=True)
        notifier.close()
        processor.close()
        status_engine.dispose()
        if lock is not None:
            lock.release()
    log.info("stopped" if start_over is None else "starting over")
    return start_over


def _open_when_reachable(settings: Settings, notifier: Notifier, stop: threading.Event) -> Processor | None:
    """open_processor, waiting out a database server that is not there yet (a passing fault,
    as at any other time) with a STATUS= line; a mistake in the settings still ends the start
    in one line. None when told to stop while waiting."""
    backoff = Backoff(first=1.0, ceiling=60.0)
    while True:
        try:
            return open_processor(settings)
        except TransientFault as fault:
            wait = backoff.next()
            if wait == backoff.first:
                log.warning("waiting for the database before starting: %s", fault)
            notifier.send(STATUS=f"starting: waiting for the database, retry in {wait:.0f} s: {fault}")
            if stop.wait(wait):
                return None


def _cooperate(membership: Membership, intake: Intake, workers: list, health: Health) -> None:
    """Renew this worker's lease, lead if nobody does, and take over the files of dead workers."""
    try:
        membership.beat()
        intake.in_hand += membership.take_over()
    except LeaseLost:
        intake.lease_lost()
        return
    except Exception as error:  # noqa: BLE001 - waited out like any passing fault
        fault = as_transient(error) or f"{type(error).__name__}: {error}"
        health.failing("workers", str(fault), 0)
        return
    health.recovered("workers")
    if membership.leading:
        for worker in workers:
            if worker.ident is None:
                worker.start()


def _guarded_leave(membership: Membership) -> None:
    try:
        membership.leave()
    except Exception as error:  # noqa: BLE001 - the lease runs out by itself
        log.warning("could not sign off as a worker (%s); others take over after the lease", error)


class Intake:
    """Takes settled files and sees each through the pipeline, waiting out passing faults."""

    def __init__(self, settings: Settings, processor: Processor, health: Health, stopping: threading.Event) -> None:
        self.settings = settings
        self.stopping = stopping  # set: claim nothing more, finish what is in hand
        self.processor = processor
        self.health = health
        watcher = settings.watcher
        self.tracker = SettleTracker(watcher.settle_seconds, watcher.incomplete_seconds)
        self.in_hand: list[Claimed] = processor.leftovers()
        self.backoff = Backoff()
        self.retry_at = 0.0
        self.worked_at: float | None = time.monotonic()  # None once tidied after the last work

    def scan(self) -> int:
        """Look through the whole intake folder; a subfolder it may not list is a fault until mended."""
        result = scan(self.settings.paths.intake, self.tracker)
        fault = result.fault()
        if fault:
            self.health.failing("intake folders", fault, self.settings.watcher.rescan_seconds)
        else:
            self.health.recovered("intake folders")
        return result.found

    def step(self, until: float) -> bool:
        """Do one piece of work; False when there was nothing to do (or a fault to wait out)."""
        if time.monotonic() < self.retry_at:
            return False
        try:
            if self.in_hand:
                self.processor.resume(self.in_hand)
                self.in_hand = []
            else:
                ready = self.tracker.take_ready(self.settings.model.batch_size)
                if not ready:
                    self._tidy_when_idle()
                    return False
                self._take(ready, until)
        except LeaseLost:
            self.lease_lost()
            return True
        except Exception as error:  # noqa: BLE001 - every fault is waited out; see _fault
            self._fault(error)
            return False
        self.backoff.reset()
        self.health.recovered("intake")
        self.worked_at = time.monotonic()
        return True

    def _tidy_when_idle(self) -> None:
        if self.worked_at is not None and time.monotonic() - self.worked_at >= TIDY_AFTER_SECONDS:
            self.processor.tidy()
            self.worked_at = None

    def lease_lost(self) -> None:
        """This worker was silent past its lease (stopped, frozen) and another took its claims:
        drop them unrecorded, and go on as a new worker (pipeline/workers.py, LeaseLost)."""
        self.in_hand = []
        self.processor.claim_folders.drop_spares()  # in the folder that was taken over
        self.processor.membership.rejoin()

    def _take(self, ready: list[Path], until: float) -> None:
        self.processor.process(self._claim_each(ready, until))
        self.in_hand = []

    def _claim_each(self, ready: list[Path], until: float) -> Iterator[Claimed]:
        """Claim files as the lanes ask for them, so claiming overlaps classifying, and keep
        taking files that settle meanwhile until ``until`` (monotonic): a burst flows through
        without the lanes waiting at the end of each step.

        Every claim is kept in ``in_hand`` until the step ends, to be resumed after a fault;
        files not taken by then (a fault, or a stop) are offered again.
        """
        waiting = deque(ready)
        try:
            while not self.stopping.is_set():
                if not waiting:
                    waiting.extend(self._next_ready(until))
                    if not waiting:
                        return
                path = waiting[0]
                if is_sidecar(path.name):
                    if not settle_sidecar(self.processor, path, self.settings.watcher.sidecar_grace_seconds):
                        self.tracker.defer(path, SIDECAR_RECHECK_SECONDS)
                    waiting.popleft()
                    continue
                claimed = self.processor.claim(path)
                waiting.popleft()
                if claimed is not None:
                    self.in_hand.append(claimed)
                    yield claimed
        finally:
            for path in waiting:
                self.tracker.defer(path, SIDECAR_RECHECK_SECONDS if is_sidecar(path.name) else 0)

    def _next_ready(self, until: float) -> list[Path]:
        """Files settled since the last look, waiting up to LINGER_SECONDS for one; none once
        ``until`` has passed."""
        linger_until = min(time.monotonic() + LINGER_SECONDS, until)
        while time.monotonic() < linger_until:
            self.tracker.changed.clear()
            ready = self.tracker.take_ready(self.settings.model.batch_size)
            if ready:
                return ready
            self.tracker.changed.wait(linger_until - time.monotonic())
        return []

    def _fault(self, error: Exception) -> None:
        fault = as_transient(error)
        if fault is None:
            log.error("unexpected error in intake; retrying", exc_info=error)
            fault = TransientFault(f"unexpected error: {type(error).__name__}: {error}")
        delay = self.backoff.next()
        self.retry_at = time.monotonic() + delay
        waiting = f" ({len(self.in_hand)} file(s) kept in state/work/)" if self.in_hand else ""
        self.health.failing("intake", f"{fault}{waiting}", delay)


def _status_line(engine: Engine, intake: Intake, health: Health) -> str:
    trouble = health.summary()
    try:
        totals = counts(engine)
        line = (f"{totals['images']} images, {totals['flagged']} flagged, {totals['quarantined']} rejected, "
                f"{intake.tracker.pending() + len(intake.in_hand)} waiting")
    except Exception as error:  # noqa: BLE001 - the status line must not take the service down
        line = f"database unavailable ({type(error).__name__})"
    return f"{trouble} | {line}" if trouble else line


def _on_signals(stop: threading.Event, reload: threading.Event) -> None:
    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: finishing the image in hand", signal.Signals(signum).name)
        stop.set()

    def request_reload(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP received: reading the configuration again")
        reload.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
