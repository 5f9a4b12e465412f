"""One image, start to end, for both `dermwatch run` and `dermwatch process`.

claim -> sha256 -> (seen by this model? sighting) -> decode -> preprocess -> classify
-> one transaction -> archive; any rejection -> a row with the reason -> quarantine.
Files move out of state/work/ only after their transaction commits, so a crash at any
point is finished by :meth:`Processor.recover` without losing or doubling anything.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from dermwatch.config import PathSettings, Settings, ensure_folders
from dermwatch.errors import RejectedImage
from dermwatch.labels import CLASS_NAMES, MELANOMA
from dermwatch.pipeline.claim import Claimed, claim, place, reclaim
from dermwatch.pipeline.classifier import Classifier, load_classifier
from dermwatch.pipeline.decode import DecodedImage, read_model_input
from dermwatch.pipeline.sidecar import read_sidecar
from dermwatch.store.db import ensure_schema, make_engine, session_scope
from dermwatch.store.models import Alert, Image, Prediction, Rejection, Sighting, probability_column, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one arrival."""

    name: str
    status: str  # classified | seen before | rejected
    detail: str  # top label and melanoma score, or the reason


@dataclass
class _Arrival:
    item: Claimed
    received_at: datetime
    data: bytes = b""
    sha256: str | None = None
    decoded: DecodedImage | None = None
    sidecar: dict[str, str] | None = None
    pixels: np.ndarray | None = None


class Processor:
    """Holds what every image needs: folders, database, classifier, limits."""

    def __init__(self, paths: PathSettings, engine: Engine, classifier: Classifier, max_pixels: int,
                 alert_channels: tuple[str, ...] = ()) -> None:
        self.paths = paths
        self.alert_channels = alert_channels
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.classifier = classifier
        self.max_pixels = max_pixels

    def claim(self, path: Path) -> Claimed | None:
        return claim(path, self.paths.work)

    def recover(self) -> list[Outcome]:
        """Finish every arrival an interrupted run left in state/work/."""
        left = reclaim(self.paths.work)
        if not left:
            return []
        log.warning("finishing %d file(s) left in %s by an interrupted run", len(left), self.paths.work)
        outcomes = []
        for item in left:
            finished = self._finish_if_recorded(item)
            outcomes += [finished] if finished else self.process([item])
        return outcomes

    def process(self, items: list[Claimed]) -> list[Outcome]:
        """Process claimed files; classify the decodable ones in one interpreter call."""
        outcomes: list[Outcome] = []
        to_classify: dict[str, _Arrival] = {}
        repeats: list[_Arrival] = []  # the same bytes twice in one batch: classified once
        for item in items:
            arrival = _Arrival(item, utc_now())
            try:
                self._read(arrival)
                seen = self._record_if_seen(arrival)
                if seen:
                    outcomes.append(seen)
                    continue
                if arrival.sha256 in to_classify:
                    repeats.append(arrival)
                    continue
                self._decode(arrival)
            except RejectedImage as rejection:
                outcomes.append(self._reject(arrival, str(rejection)))
                continue
            to_classify[arrival.sha256] = arrival
        if to_classify:
            arrivals = list(to_classify.values())
            probabilities = self.classifier.predict(np.stack([a.pixels for a in arrivals]))
            outcomes += [self._store(a, p) for a, p in zip(arrivals, probabilities, strict=True)]
        outcomes += [self._record_if_seen(a) for a in repeats]
        return outcomes

    def _read(self, arrival: _Arrival) -> None:
        path = arrival.item.work_path
        if path.is_symlink():
            raise RejectedImage("symbolic links are refused: copy the image itself into the intake folder")
        if not path.is_file():
            raise RejectedImage("not a regular file")
        arrival.data = path.read_bytes()
        arrival.sha256 = hashlib.sha256(arrival.data).hexdigest()
        if not arrival.data:
            raise RejectedImage("empty file (0 bytes)")
        arrival.sidecar = read_sidecar(arrival.item.sidecar_path)

    def _decode(self, arrival: _Arrival) -> None:
        arrival.decoded, arrival.pixels = read_model_input(
            arrival.data, self.classifier.input_size, max_pixels=self.max_pixels
        )

    def _finish_if_recorded(self, item: Claimed) -> Outcome | None:
        """After a crash: an arrival whose result is committed only needs its file moved."""
        with self.sessions() as session:
            sighting = session.scalar(select(Sighting).where(Sighting.claim == item.token))
            if sighting is not None:
                self._archive(item, sighting.image.sha256, sighting.received_at)
                return Outcome(item.original_name, "classified", "recovered after restart")
            rejection = session.scalar(select(Rejection).where(Rejection.claim == item.token))
            if rejection is not None:
                self._quarantine(item)
                return Outcome(item.original_name, "rejected", rejection.reason)
        return None

    def _record_if_seen(self, arrival: _Arrival) -> Outcome | None:
        """Same bytes already classified by this model: one more sighting, no new prediction."""
        card = self.classifier.card
        with session_scope(self.sessions) as session:
            image = session.scalar(select(Image).where(Image.sha256 == arrival.sha256))
            previous = _prediction_by(image, card.sha256)
            if previous is None:
                return None
            session.add(_sighting(image, arrival))
        self._archive(arrival.item, arrival.sha256, arrival.received_at)
        log.info("%s: same bytes as %s, already classified", arrival.item.original_name, image.original_name)
        return Outcome(arrival.item.original_name, "seen before", _describe(previous))

    def _store(self, arrival: _Arrival, probabilities: np.ndarray) -> Outcome:
        card = self.classifier.card
        decoded = arrival.decoded
        melanoma_score = float(probabilities[CLASS_NAMES.index(MELANOMA)])
        with session_scope(self.sessions) as session:
            image = session.scalar(select(Image).where(Image.sha256 == arrival.sha256))
            if image is None:
                image = Image(
                    sha256=arrival.sha256,
                    original_name=arrival.item.original_name,
                    sidecar=arrival.sidecar,
                    received_at=arrival.received_at,
                    processed_at=utc_now(),
                    bytes=len(arrival.data),
                    format=decoded.format,
                    width=decoded.width,
                    height=decoded.height,
                    archive_path=str(_archive_target(self.paths, arrival.item, arrival.sha256, arrival.received_at)),
                )
                session.add(image)
            prediction = Prediction(
                image=image,
                model_version=card.version,
                model_sha256=card.sha256,
                created_at=utc_now(),
                top_label=CLASS_NAMES[int(np.argmax(probabilities))],
                melanoma_score=melanoma_score,
                threshold=card.melanoma_threshold,
                flagged=melanoma_score >= card.melanoma_threshold,
                **{probability_column(label): float(p) for label, p in zip(CLASS_NAMES, probabilities, strict=True)},
            )
            session.add_all([prediction, _sighting(image, arrival)])
            if prediction.flagged:
                # Queued in the same transaction: an alert owed is never lost to a crash.
                now = utc_now()
                session.add_all(
                    Alert(prediction=prediction, channel=channel, created_at=now, next_attempt_at=now)
                    for channel in self.alert_channels
                )
        self._archive(arrival.item, arrival.sha256, arrival.received_at)
        outcome = Outcome(arrival.item.original_name, "classified", _describe(prediction))
        log.info("%s: %s", outcome.name, outcome.detail)
        return outcome

    def _reject(self, arrival: _Arrival, reason: str) -> Outcome:
        item = arrival.item
        with session_scope(self.sessions) as session:
            session.add(
                Rejection(
                    claim=item.token,
                    original_name=item.original_name,
                    sha256=arrival.sha256,
                    bytes=len(arrival.data) if arrival.sha256 else None,
                    reason=reason,
                    rejected_at=arrival.received_at,
                    quarantine_path=str(self.paths.quarantine / item.work_path.name),
                )
            )
        self._quarantine(item)
        log.warning("%s: rejected: %s", item.original_name, reason)
        return Outcome(item.original_name, "rejected", reason)

    def _archive(self, item: Claimed, sha256: str, received_at: datetime) -> None:
        target = _archive_target(self.paths, item, sha256, received_at)
        if item.sidecar_path is not None:
            place(item.sidecar_path, target.with_name(f"{target.stem}.json"))
        place(item.work_path, target)

    def _quarantine(self, item: Claimed) -> None:
        if item.sidecar_path is not None:
            place(item.sidecar_path, self.paths.quarantine / item.sidecar_path.name)
        place(item.work_path, self.paths.quarantine / item.work_path.name)


def open_processor(settings: Settings) -> Processor:
    """Load the model, check the schema, create the folders: what `run` and `process` share."""
    classifier = load_classifier(settings.model.path, settings.model.threads)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    ensure_folders(settings)
    return Processor(settings.paths, engine, classifier, settings.max_pixels, settings.alerts.channels)


def _archive_target(paths: PathSettings, item: Claimed, sha256: str, received_at: datetime) -> Path:
    day = received_at.strftime("%Y/%m/%d")
    return paths.archive / day / f"{sha256[:12]}-{item.original_name}"


def _prediction_by(image: Image | None, model_sha256: str) -> Prediction | None:
    if image is None:
        return None
    return next((p for p in image.predictions if p.model_sha256 == model_sha256), None)


def _sighting(image: Image, arrival: _Arrival) -> Sighting:
    return Sighting(
        image=image,
        claim=arrival.item.token,
        original_name=arrival.item.original_name,
        received_at=arrival.received_at,
    )


def _describe(prediction: Prediction) -> str:
    flag = " FLAGGED" if prediction.flagged else ""
    return f"{prediction.top_label}, P(melanoma) {prediction.melanoma_score:.3f}{flag}"
