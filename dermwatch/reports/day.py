"""Gather one local day's images, predictions and rejections from the database.

Plain SQLAlchemy queries only, so the same code serves SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dermwatch.labels import CLASS_NAMES, MALIGNANT
from dermwatch.site.threshold import AlertThreshold
from dermwatch.store.models import Image, Prediction, Rejection, Review, Sighting


@dataclass(frozen=True)
class ArrivalRow:
    """One arrival of an image on the day, with its own sidecar: one photo sent for two
    patients shows both."""

    original_name: str
    received_at: datetime  # local
    sidecar: dict[str, str]

    def references(self) -> str:
        """Patient / lesion / body site, as one line."""
        return " / ".join(filter(None, (self.sidecar.get(k) for k in ("patient_reference", "lesion_reference",
                                                                     "body_site"))))


@dataclass(frozen=True)
class ImageRow:
    """One image that arrived on the day, with its newest prediction and every arrival."""

    sha256: str
    original_name: str
    received_at: datetime  # local time of its first arrival that day
    arrivals: tuple[ArrivalRow, ...]  # oldest first
    archive_path: str
    probabilities: dict[str, float]
    top_label: str
    melanoma_score: float
    flagged: bool  # at or above the threshold in force when the day is loaded: listed as suspected
    alerted: bool  # flagged on arrival, under the threshold in force then, and so alerted
    threshold_on_arrival: float
    model_version: str
    model_sha256: str
    reviewed_by: str | None = None  # a dermatologist marked it looked at (`dermwatch review`)
    reviewed_at: datetime | None = None  # local

    def top(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:n]

    @property
    def flag_changed(self) -> bool:
        """Flagged now but not on arrival, or the other way round: the threshold changed since."""
        return self.flagged != self.alerted


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

    def by_patient(self) -> dict[str, list[tuple[ImageRow, ArrivalRow]]]:
        """Arrivals with a patient reference, grouped by it (flagged images first within each)."""
        groups: dict[str, list[tuple[ImageRow, ArrivalRow]]] = defaultdict(list)
        for row in self.images:  # flagged first, as the page lists them
            for arrival in row.arrivals:
                if arrival.sidecar.get("patient_reference"):
                    groups[arrival.sidecar["patient_reference"]].append((row, arrival))
        return dict(sorted(groups.items()))

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


def load_day(engine: Engine, day: date, zone: ZoneInfo, threshold: AlertThreshold | None) -> Day:
    """The day's images, flagged by ``threshold`` (the one in force now) where their prediction
    is by its model; predictions by another model keep the flag they got on arrival."""
    start, end = utc_bounds(day, zone)
    result = Day(date=day, zone=zone)
    with Session(engine) as session:
        sightings = session.scalars(
            select(Sighting).where(Sighting.received_at >= start, Sighting.received_at < end)
            .order_by(Sighting.received_at, Sighting.id)
        ).all()
        by_image: dict[int, list[ArrivalRow]] = defaultdict(list)
        for sighting in sightings:
            by_image[sighting.image_id].append(
                ArrivalRow(sighting.original_name, sighting.received_at.astimezone(zone), sighting.sidecar or {})
            )
        images = session.scalars(select(Image).where(Image.id.in_(by_image))).all() if by_image else []
        newest: dict[int, Prediction] = {}
        if by_image:
            for prediction in session.scalars(
                select(Prediction).where(Prediction.image_id.in_(by_image)).order_by(Prediction.created_at)
            ):
                newest[prediction.image_id] = prediction
        reviews = {r.image_id: r for r in session.scalars(select(Review).where(Review.image_id.in_(by_image)))} \
            if by_image else {}
        rows = [_image_row(image, newest[image.id], tuple(by_image[image.id]), reviews.get(image.id), zone,
                           threshold) for image in images if image.id in newest]
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


def _image_row(image: Image, prediction: Prediction, arrivals: tuple[ArrivalRow, ...], review: Review | None,
               zone: ZoneInfo, threshold: AlertThreshold | None) -> ImageRow:
    in_force = threshold is not None and threshold.model_sha256 == prediction.model_sha256
    return ImageRow(
        sha256=image.sha256,
        original_name=arrivals[0].original_name,
        received_at=arrivals[0].received_at,
        arrivals=arrivals,
        archive_path=image.archive_path,
        probabilities=prediction.probabilities(),
        top_label=prediction.top_label,
        melanoma_score=prediction.melanoma_score,
        flagged=prediction.melanoma_score >= threshold.value if in_force else prediction.flagged,
        alerted=prediction.flagged,
        threshold_on_arrival=prediction.threshold,
        model_version=prediction.model_version,
        model_sha256=prediction.model_sha256,
        reviewed_by=review.reviewer if review else None,
        reviewed_at=review.reviewed_at.astimezone(zone) if review else None,
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
