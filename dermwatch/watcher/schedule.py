"""When the service writes which day's report.

- a past day whose report is missing or older than its last arrival: now (this covers
  days the service was down for, and images that came in after yesterday's last report);
- today, once it is older than its last arrival: when no image has arrived for
  ``quiet_seconds`` (a burst has ended), or ``refresh_minutes`` after it fell behind while
  images keep coming; and once at ``daily_at`` whatever happened. A report left behind by
  a restart is therefore rewritten at start-up.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from dermwatch.config import ReportSettings


def rendered_times(reports_dir: Path) -> dict[date, datetime]:
    """When each day's report was last written, from the files themselves."""
    times = {}
    for path in reports_dir.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9].json"):
        times[date.fromisoformat(path.stem)] = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    return times


class ReportSchedule:
    def __init__(self, settings: ReportSettings, rendered: dict[date, datetime]) -> None:
        self.settings = settings
        self.rendered = dict(rendered)
        self.behind_since: dict[date, datetime] = {}  # when each day's report fell behind its arrivals

    def due(self, now: datetime, latest_arrival: dict[date, datetime]) -> list[date]:
        """Days to render at ``now`` (aware), given each day's latest arrival (aware)."""
        zone = self.settings.timezone
        today = now.astimezone(zone).date()
        refresh = timedelta(minutes=self.settings.refresh_minutes)
        quiet = timedelta(seconds=self.settings.quiet_seconds)
        due = set()
        for day, latest in latest_arrival.items():
            last = self.rendered.get(day)
            if last is not None and last >= latest:
                continue
            behind_since = self.behind_since.setdefault(day, now)
            if day < today or now - latest >= quiet or now - behind_since >= refresh:
                due.add(day)
        daily = datetime.combine(today, self.settings.daily_at, zone)
        if now >= daily and self.rendered.get(today, datetime.min.replace(tzinfo=timezone.utc)) < daily:
            due.add(today)
        return sorted(due)

    def mark(self, day: date, when: datetime) -> None:
        self.rendered[day] = when
        self.behind_since.pop(day, None)
