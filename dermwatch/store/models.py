"""Tables: images (one per distinct content), sightings (every arrival), predictions, rejections."""

from __future__ import annotations

import builtins
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from dermwatch.labels import CLASS_NAMES


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Stores aware UTC datetimes; gives them back aware, whatever the backend keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=timezone.utc)


def probability_column(label: str) -> str:
    """Column name holding P(label), e.g. p_basal_cell_carcinoma."""
    return "p_" + label.replace(" ", "_")


class Base(DeclarativeBase):
    pass


class Image(Base):
    """One distinct image content (by sha256), however often it arrived."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    original_name: Mapped[str] = mapped_column(Text)  # of its first arrival, as display text
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    archive_path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="classified")

    sightings: Mapped[list[Sighting]] = relationship(back_populates="image")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="image")


class Sighting(Base):
    """One arrival of a file; the same bytes dropped twice give two sightings.

    The sidecar belongs to the arrival, not to the image: the same photo sent for two
    patients keeps both patients' references.
    """

    __tablename__ = "sightings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    claim: Mapped[str] = mapped_column(String(64), unique=True)  # the work/ token: one row per arrival
    original_name: Mapped[str] = mapped_column(Text)  # display text: odd bytes escaped (pipeline/names.py)
    original_name_bytes: Mapped[bytes | None] = mapped_column(LargeBinary)  # the exact name, when not UTF-8
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    sidecar: Mapped[dict | None] = mapped_column(JSON)

    image: Mapped[Image] = relationship(back_populates="sightings")


class Prediction(Base):
    """What one model said about one image."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("image_id", "model_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    top_label: Mapped[str] = mapped_column(String(32))
    melanoma_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean, index=True)
    # P(class) for each of the nine classes, named by probability_column().
    p_actinic_keratosis: Mapped[float] = mapped_column(Float)
    p_basal_cell_carcinoma: Mapped[float] = mapped_column(Float)
    p_dermatofibroma: Mapped[float] = mapped_column(Float)
    p_melanoma: Mapped[float] = mapped_column(Float)
    p_nevus: Mapped[float] = mapped_column(Float)
    p_pigmented_benign_keratosis: Mapped[float] = mapped_column(Float)
    p_seborrheic_keratosis: Mapped[float] = mapped_column(Float)
    p_squamous_cell_carcinoma: Mapped[float] = mapped_column(Float)
    p_vascular_lesion: Mapped[float] = mapped_column(Float)

    image: Mapped[Image] = relationship(back_populates="predictions")

    def probabilities(self) -> dict[str, float]:
        return {label: getattr(self, probability_column(label)) for label in CLASS_NAMES}


class Rejection(Base):
    """A file that could not be classified, and why; the file itself waits in quarantine."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    claim: Mapped[str] = mapped_column(String(64), unique=True)
    original_name: Mapped[str] = mapped_column(Text)
    # builtins.bytes: inside this class "bytes" names the size column below.
    original_name_bytes: Mapped[builtins.bytes | None] = mapped_column(LargeBinary)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    rejected_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    quarantine_path: Mapped[str] = mapped_column(Text)  # where the file is now (intake, if it could not be moved)


class Alert(Base):
    """One alert owed for a flagged prediction on one channel; a durable retry queue."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("prediction_id", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # email | command
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)

    prediction: Mapped[Prediction] = relationship()


class SiteThreshold(Base):
    """One calibration of the alert threshold on a site's own labelled images, for one model.

    Rows are never updated: the newest row for a model is the threshold in force, the
    older ones are its history.
    """

    __tablename__ = "site_thresholds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    threshold: Mapped[float] = mapped_column(Float)
    target_sensitivity: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(16))  # images | outcomes
    source: Mapped[str] = mapped_column(Text)  # the folder, CSV or "confirmed outcomes" it was fitted on
    images: Mapped[int] = mapped_column(Integer)
    melanomas: Mapped[int] = mapped_column(Integer)
    sensitivity: Mapped[float] = mapped_column(Float)
    sensitivity_low: Mapped[float] = mapped_column(Float)
    sensitivity_high: Mapped[float] = mapped_column(Float)
    specificity: Mapped[float | None] = mapped_column(Float)  # None: no non-melanoma image
    specificity_low: Mapped[float | None] = mapped_column(Float)
    specificity_high: Mapped[float | None] = mapped_column(Float)
    flag_rate: Mapped[float] = mapped_column(Float)  # share of the calibration images it flags


class ConfirmedDiagnosis(Base):
    """A biopsy or clinical diagnosis of an image, imported by `dermwatch outcome import`."""

    __tablename__ = "confirmed_diagnoses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), unique=True)
    diagnosis: Mapped[str] = mapped_column(String(32))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(Text)  # the imported file's name

    image: Mapped[Image] = relationship()


class Review(Base):
    """A dermatologist looked at a flagged image: who, and when."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), unique=True)
    reviewer: Mapped[str] = mapped_column(Text)
    reviewed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Worker(Base):
    """One `dermwatch run` (or `process`) sharing a PostgreSQL database with others.

    Its heartbeat is its lease: a worker silent for longer than the lease is dead, and
    another takes over the files it had claimed.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    leading: Mapped[bool] = mapped_column(Boolean, default=False)  # writes reports and sends alerts
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
