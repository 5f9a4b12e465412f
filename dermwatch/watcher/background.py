"""Work the service does beside intake, each in its own thread: reports and alerts.

Neither may hold up intake, and neither may die quietly: a failing round is reported to
the service's health (STATUS=, `dermwatch status`, one log line) and retried with back-off.
"""

from __future__ import annotations

import logging
import threading
from datetime import date, datetime, timedelta

from sqlalchemy import Engine

from dermwatch.alerts import send_pending
from dermwatch.config import Settings
from dermwatch.errors import as_transient
from dermwatch.pipeline.classifier import Predictor
from dermwatch.reports.budget import CpuBudget
from dermwatch.reports.day import days_with_data
from dermwatch.reports.pictures import RenderInterrupted
from dermwatch.reports.render import Reporter
from dermwatch.site.changes import site_state
from dermwatch.store.models import utc_now
from dermwatch.store.queries import alert_counts
from dermwatch.watcher.health import Backoff, Health
from dermwatch.watcher.schedule import ReportSchedule, rendered_times

log = logging.getLogger(__name__)

#: How often the workers look for work.
CHECK_SECONDS = 1.0
#: An arrival is stamped when claimed and committed a little later; a report counts as
#: covering arrivals only up to this long before it was started.
COMMIT_MARGIN = timedelta(seconds=5)


class _Worker(threading.Thread):
    def __init__(self, name: str, stop: threading.Event, health: Health) -> None:
        super().__init__(name=name, daemon=True)
        self.stop = stop
        self.health = health
        self.backoff = Backoff(first=CHECK_SECONDS, ceiling=300.0)

    def run(self) -> None:
        self.prepare()
        while True:
            wait = CHECK_SECONDS
            try:
                self.round()
            except Exception as error:  # noqa: BLE001 - reported; the next round retries
                if self.backoff.current == 0:
                    log.debug("%s: round failed", self.name, exc_info=error)
                wait = self.backoff.next()
                fault = as_transient(error) or f"{type(error).__name__}: {error}"
                self.health.failing(self.name, str(fault), wait)
            else:
                self.backoff.reset()
                self.health.recovered(self.name)
            if self.stop.wait(wait):
                return

    def prepare(self) -> None:
        """Set-up inside the thread, before the first round."""

    def round(self) -> None:
        raise NotImplementedError


class ReportWorker(_Worker):
    """Writes reports on the schedule of watcher/schedule.py; ``heatmaps`` classifies the
    occluded copies (the service's lanes, lending an interpreter)."""

    def __init__(self, settings: Settings, engine: Engine, heatmaps: Predictor, stop: threading.Event,
                 health: Health) -> None:
        super().__init__("reports", stop, health)
        self.settings = settings
        self.engine = engine
        self.heatmaps = heatmaps
        self.latest: dict[date, datetime] = {}
        self.checked_at: datetime | None = None
        self.site_shown: tuple | None = None  # site_state() when today's report was last written

    def prepare(self) -> None:
        budget = CpuBudget(self.settings.reports.cpu_share, self.stop)
        self.reporter = Reporter(self.settings, self.engine, self.heatmaps, stopping=self.stop, budget=budget)
        self.schedule = ReportSchedule(self.settings.reports, rendered_times(self.settings.paths.reports))

    def round(self) -> None:
        now = utc_now()
        since = self.checked_at - COMMIT_MARGIN if self.checked_at else None
        for day, latest in days_with_data(self.engine, self.settings.reports.timezone, since).items():
            self.latest[day] = max(latest, self.latest.get(day, latest))
        self.checked_at = now
        today = now.astimezone(self.settings.reports.timezone).date()
        due = self.schedule.due(now, self.latest)
        site = site_state(self.engine, self.reporter.card)
        if site != self.site_shown and today not in due:
            due.append(today)  # a calibration, outcome import or review since today's report
        for day in due:
            try:
                rendered = self.reporter.render(day)
            except RenderInterrupted:
                return  # stopping: the next start renders it, as the report is older than its arrivals
            self.schedule.mark(day, now - COMMIT_MARGIN)
            if day == today:
                self.site_shown = site
                self.health.warn("alert rate", rendered.drift_warning)
            log.info("report %s: %d images, %d flagged, %d could not be read", rendered.html, rendered.images,
                     rendered.flagged, rendered.rejected)


class AlertWorker(_Worker):
    def __init__(self, settings: Settings, engine: Engine, stop: threading.Event, health: Health) -> None:
        super().__init__("alerts", stop, health)
        self.settings = settings
        self.engine = engine

    def round(self) -> None:
        send_pending(self.engine, self.settings.alerts, self.settings.reports.site_name,
                     self.settings.reports.timezone)
        self._show_failing()

    def _show_failing(self) -> None:
        """Alerts whose last try failed are a fault in `status` until they go out: a failure that
        retrying cannot cure (a wrong address, a command that is not there) needs a person."""
        state = alert_counts(self.engine)
        if state["alerts_failing"]:
            retry = self.settings.alerts.retry_minutes
            self.health.failing("alert delivery", f"{state['alerts_failing']} alert(s) not delivered, tried again "
                                f"every {retry:g} min; last error: {state['alert_error']}", retry * 60)
        else:
            self.health.recovered("alert delivery")
