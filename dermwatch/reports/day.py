"""Gather one local day's images, predictions and rejections from the database.

Plain SQLAlchemy queries only, so the same code serves SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dermwatch.labels import CLASS_NAMES, MALIGNANT
from dermwatch.store.models import Image, Prediction, Rejection, Sighting


@dataclass(frozen=True)
class ImageRow:
    """One image that arrived on the day, with its newest prediction."""

    sha256: str
    original_name: str
    received_at: datetime  # local time of its first arrival that day
    arrivals: int
    sidecar: dict[str, str]
    archive_path: str
    probabilities: dict[str, float]
    top_label: str
    melanoma_score: float
    threshold: float
    flagged: bool
    model_version: str
    model_sha256: str

    def top(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:n]


@dataclass(frozen=True)
class RejectedRow:
    original_name: str
    reason: str
    rejected_at: datetime  # local


@dataclass
class Day:
    date: date
    zone: ZoneInfo
    flagged: list[ImageRow] = field(default_factory=list)
    others: list[ImageRow] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)

    @property
    def images(self) -> list[ImageRow]:
        return self.flagged + self.others

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(CLASS_NAMES, 0)
        for row in self.images:
            counts[row.top_label] += 1
        return counts


def utc_bounds(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants at which local ``day`` starts and the next one starts."""
    start = datetime.combine(day, time(0), zone)
    end = datetime.combine(day + timedelta(days=1), time(0), zone)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


def load_day(engine: Engine, day: date, zone: ZoneInfo) -> Day:
    start, end = utc_bounds(day, zone)
    result = Day(date=day, zone=zone)
    with Session(engine) as session:
        arrivals = session.execute(
            select(Sighting.image_id, func.min(Sighting.received_at), func.count())
            .where(Sighting.received_at >= start, Sighting.received_at < end)
            .group_by(Sighting.image_id)
        ).all()
        first_seen = {image_id: (first, count) for image_id, first, count in arrivals}
        images = session.scalars(select(Image).where(Image.id.in_(first_seen))).all() if first_seen else []
        newest: dict[int, Prediction] = {}
        if first_seen:
            for prediction in session.scalars(
                select(Prediction).where(Prediction.image_id.in_(first_seen)).order_by(Prediction.created_at)
            ):
                newest[prediction.image_id] = prediction
        rows = [_image_row(image, newest[image.id], *first_seen[image.id], zone) for image in images
                if image.id in newest]
        result.rejected = [
            RejectedRow(r.original_name, r.reason, r.rejected_at.astimezone(zone))
            for r in session.scalars(
                select(Rejection).where(Rejection.rejected_at >= start, Rejection.rejected_at < end)
                .order_by(Rejection.rejected_at, Rejection.id)
            )
        ]
    result.flagged = sorted((r for r in rows if r.flagged), key=lambda r: (-r.melanoma_score, r.received_at))
    result.others = sorted(
        (r for r in rows if not r.flagged),
        key=lambda r: (r.top_label not in MALIGNANT, -r.melanoma_score, r.received_at, r.original_name),
    )
    return result


def _image_row(image: Image, prediction: Prediction, first: datetime, count: int, zone: ZoneInfo) -> ImageRow:
    return ImageRow(
        sha256=image.sha256,
        original_name=image.original_name,
        received_at=first.astimezone(zone),
        arrivals=count,
        sidecar=image.sidecar or {},
        archive_path=image.archive_path,
        probabilities=prediction.probabilities(),
        top_label=prediction.top_label,
        melanoma_score=prediction.melanoma_score,
        threshold=prediction.threshold,
        flagged=prediction.flagged,
        model_version=prediction.model_version,
        model_sha256=prediction.model_sha256,
    )


def days_with_data(engine: Engine, zone: ZoneInfo, since: datetime | None = None) -> dict[date, datetime]:
    """Each local day with an arrival or a rejection (after ``since``), and its latest one (UTC)."""
    latest: dict[date, datetime] = defaultdict(lambda: datetime.min.replace(tzinfo=timezone.utc))
    with Session(engine) as session:
        for column in (Sighting.received_at, Rejection.rejected_at):
            query = select(column)
            if since is not None:
                query = query.where(column > since)
            for (moment,) in session.execute(query):
                day = moment.astimezone(zone).date()
                latest[day] = max(latest[day], moment)
    return dict(latest)
