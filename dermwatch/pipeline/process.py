"""One image, start to end, for both `dermwatch run` and `dermwatch process`.

claim -> sha256 -> (seen by this model? sighting) -> decode -> preprocess -> classify
-> one transaction -> archive; any rejection -> a row with the reason -> quarantine.
Files move out of state/work/ only after their transaction commits, so a crash at any
point is finished by :meth:`Processor.recover` without losing or doubling anything.

One file's fault is that file's fate (quarantine, or a rejection row where it cannot even
be moved); a fault of the disk or the database is raised as :class:`TransientFault` for
the caller to wait out, with the arrivals left in state/work/ to be resumed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from dermwatch.config import PathSettings, Settings, ensure_folders
from dermwatch.errors import RejectedImage, as_transient
from dermwatch.labels import CLASS_NAMES, MELANOMA
from dermwatch.permissions import process_umask
from dermwatch.pipeline.claim import (
    PLACED_NAME_MAX,
    Claimed,
    Unmovable,
    archive_name,
    claim,
    new_token,
    place,
    reclaim,
    release,
)
from dermwatch.pipeline.classifier import Classifier, load_classifier
from dermwatch.pipeline.decode import DecodedImage, read_model_input
from dermwatch.pipeline.names import display_name, fitted_name, name_bytes
from dermwatch.pipeline.sidecar import read_sidecar
from dermwatch.pipeline.workers import Membership, cooperative
from dermwatch.store.db import ensure_schema, make_engine, session_scope
from dermwatch.store.models import Alert, Image, Prediction, Rejection, Sighting, probability_column, utc_now
from dermwatch.threshold import threshold_in_force

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

    @property
    def name(self) -> str:
        return display_name(self.item.original_name)


class Processor:
    """Holds what every image needs: folders, database, classifier, limits."""

    def __init__(self, paths: PathSettings, engine: Engine, classifier: Classifier, max_pixels: int,
                 alert_channels: tuple[str, ...] = (), zone: ZoneInfo | timezone = timezone.utc,
                 membership: Membership | None = None) -> None:
        self.paths = paths
        self.membership = membership  # PostgreSQL: this process among several workers
        # Claims go to a worker's own folder when several share the state folder.
        self.work_dir = membership.work_dir if membership else paths.work
        self.alert_channels = alert_channels
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.classifier = classifier
        self.max_pixels = max_pixels
        self.zone = zone  # archive folders are named by the site's local date
        self.umask = process_umask()

    def claim(self, path: Path) -> Claimed | None:
        """Take ``path`` into state/work/; None if it vanished or cannot be moved (recorded once)."""
        try:
            return claim(path, self.work_dir)
        except Unmovable as error:
            self._record_unmovable(path, str(error))
            return None

    def leftovers(self) -> list[Claimed]:
        """Arrivals an interrupted run left in state/work/, to be resumed."""
        left = reclaim(self.work_dir) if self.work_dir.is_dir() else []
        if left:
            log.warning("finishing %d file(s) left in %s by an interrupted run", len(left), self.work_dir)
        return left

    def recover(self) -> list[Outcome]:
        """Finish every arrival an interrupted run left in state/work/."""
        return self.resume(self.leftovers())

    def resume(self, items: list[Claimed]) -> list[Outcome]:
        """Finish claimed arrivals whatever state they are in: recorded ones are only moved on."""
        outcomes, unrecorded = [], []
        for item in items:
            finished = _guarded(lambda item=item: self._finish_if_recorded(item))
            if finished:
                outcomes.append(finished)
            else:
                unrecorded.append(item)
        return outcomes + self.process(unrecorded)

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
            except Exception as error:  # noqa: BLE001 - sorted by _blame: this file's fate, or a passing fault
                outcomes.append(self._reject(arrival, _blame(error)))
                continue
            to_classify[arrival.sha256] = arrival
        if to_classify:
            arrivals = list(to_classify.values())
            probabilities = self.classifier.predict(np.stack([a.pixels for a in arrivals]))
            for arrival, p in zip(arrivals, probabilities, strict=True):
                try:
                    outcomes.append(self._store(arrival, p))
                except Exception as error:  # noqa: BLE001 - as above
                    outcomes.append(self._reject(arrival, _blame(error)))
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
        sidecar_name = display_name(Path(arrival.item.original_name).stem) + ".json"
        arrival.sidecar = read_sidecar(arrival.item.sidecar_path, sidecar_name)

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
                return Outcome(display_name(item.original_name), "classified", "recovered after restart")
            rejection = session.scalar(select(Rejection).where(Rejection.claim == item.token))
            if rejection is not None:
                self._quarantine(item)
                return Outcome(display_name(item.original_name), "rejected", rejection.reason)
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
        log.info("%s: same bytes as %s, already classified", arrival.name, image.original_name)
        return Outcome(arrival.name, "seen before", _describe(previous))

    def _store(self, arrival: _Arrival, probabilities: np.ndarray) -> Outcome:
        try:
            return self._store_prediction(arrival, probabilities)
        except IntegrityError:
            # Another process (`dermwatch process` beside the service) stored the same bytes
            # a moment ago: this arrival is a sighting of that image.
            seen = self._record_if_seen(arrival)
            if seen is None:
                raise
            return seen

    def _store_prediction(self, arrival: _Arrival, probabilities: np.ndarray) -> Outcome:
        card = self.classifier.card
        decoded = arrival.decoded
        melanoma_score = float(probabilities[CLASS_NAMES.index(MELANOMA)])
        archive_path = self.archive_target(arrival.item.original_name, arrival.sha256, arrival.received_at)
        with session_scope(self.sessions) as session:
            image = session.scalar(select(Image).where(Image.sha256 == arrival.sha256))
            if image is None:
                image = Image(
                    sha256=arrival.sha256,
                    original_name=arrival.name,
                    received_at=arrival.received_at,
                    processed_at=utc_now(),
                    bytes=len(arrival.data),
                    format=decoded.format,
                    width=decoded.width,
                    height=decoded.height,
                    archive_path=str(archive_path),
                )
                session.add(image)
            # Asked in the same transaction: a site calibration takes effect with the next image.
            threshold = threshold_in_force(session, card).value
            prediction = Prediction(
                image=image,
                model_version=card.version,
                model_sha256=card.sha256,
                created_at=utc_now(),
                top_label=CLASS_NAMES[int(np.argmax(probabilities))],
                melanoma_score=melanoma_score,
                threshold=threshold,
                flagged=melanoma_score >= threshold,
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
        outcome = Outcome(arrival.name, "classified", _describe(prediction))
        log.info("%s: %s", outcome.name, outcome.detail)
        return outcome

    def _reject(self, arrival: _Arrival, reason: str) -> Outcome:
        item = arrival.item
        with session_scope(self.sessions) as session:
            session.add(
                rejection(item.token, item.original_name, reason, self.paths.quarantine / _quarantine_name(item),
                          sha256=arrival.sha256, size=len(arrival.data) if arrival.sha256 else None,
                          at=arrival.received_at)
            )
        self._quarantine(item)
        log.warning("%s: rejected: %s", arrival.name, reason)
        return Outcome(arrival.name, "rejected", reason)

    def _record_unmovable(self, path: Path, why: str) -> None:
        """A file that cannot even be moved: one rejection row (not one per scan), and it stays."""
        shown = display_name(str(path))
        try:
            size: int | None = path.lstat().st_size
        except OSError:
            size = None
        reason = (f"cannot take it out of the intake folder ({why}); it stays there: give the service's "
                  "user write access to its folder and read access to the file")
        with session_scope(self.sessions) as session:
            known = session.scalar(
                select(Rejection.id).where(Rejection.quarantine_path == shown, Rejection.reason == reason)
                .where(Rejection.bytes.is_(None) if size is None else Rejection.bytes == size)
            )
            if known is None:
                session.add(rejection(new_token(), path.name, reason, shown, size=size))
        if known is None:
            log.error("%s: %s", shown, reason)

    def _archive(self, item: Claimed, sha256: str, received_at: datetime) -> None:
        target = self.archive_target(item.original_name, sha256, received_at)
        if item.sidecar_path is not None:
            place(item.sidecar_path, target.parent, f"{target.stem}.json", self.umask)
        place(item.work_path, target.parent, target.name, self.umask)
        release(item)

    def _quarantine(self, item: Claimed) -> None:
        name = _quarantine_name(item)
        if item.sidecar_path is not None:
            place(item.sidecar_path, self.paths.quarantine, f"{Path(name).stem}.json", self.umask)
        place(item.work_path, self.paths.quarantine, name, self.umask)
        release(item)

    def archive_target(self, original_name: str, sha256: str, received_at: datetime) -> Path:
        """archive/YYYY/MM/DD/<sha-prefix>-<name>, by the site's local date of the arrival."""
        day = received_at.astimezone(self.zone).strftime("%Y/%m/%d")
        return self.paths.archive / day / archive_name(sha256, original_name)


def open_processor(settings: Settings) -> Processor:
    """Check the database, load the model, create the folders: what `run` and `process` share.

    On PostgreSQL the processor joins the workers (``processor.membership``) and claims into
    its own folder of state/work/.
    """
    engine = make_engine(settings.database_url, settings.busy_timeout_seconds)
    ensure_schema(engine)
    classifier = load_classifier(settings.model.path, settings.model.threads)
    ensure_folders(settings)
    membership = Membership(engine, settings.paths.work, settings.worker_lease_seconds) \
        if cooperative(settings.database_url) else None
    return Processor(settings.paths, engine, classifier, settings.max_pixels, settings.alerts.channels,
                     settings.reports.timezone, membership)


def _blame(error: Exception) -> str:
    """The reason one file is rejected for ``error``; a passing fault is raised instead."""
    transient = as_transient(error)
    if transient is not None:
        raise transient from error
    if isinstance(error, RejectedImage):
        return str(error)
    if isinstance(error, OSError):
        return f"cannot read the file: {error.strerror or error}"
    log.error("unexpected error on one file", exc_info=error)
    return f"unexpected error ({type(error).__name__}: {error}); the file is kept for inspection"


def _guarded(step):
    """Run ``step``; a passing fault comes out as TransientFault."""
    try:
        return step()
    except Exception as error:
        transient = as_transient(error)
        if transient is None:
            raise
        raise transient from error


def rejection(claim: str, raw_name: str, reason: str, where: Path | str, *, sha256: str | None = None,
              size: int | None = None, at: datetime | None = None) -> Rejection:
    """The row that says why one arrival was not classified, and where the file is now."""
    return Rejection(claim=claim, original_name=display_name(raw_name), original_name_bytes=name_bytes(raw_name),
                     sha256=sha256, bytes=size, reason=reason, rejected_at=at or utc_now(), quarantine_path=str(where))


def _quarantine_name(item: Claimed) -> str:
    return fitted_name(f"{item.token}-", item.original_name, PLACED_NAME_MAX)


def _prediction_by(image: Image | None, model_sha256: str) -> Prediction | None:
    if image is None:
        return None
    return next((p for p in image.predictions if p.model_sha256 == model_sha256), None)


def _sighting(image: Image, arrival: _Arrival) -> Sighting:
    return Sighting(
        image=image,
        claim=arrival.item.token,
        original_name=arrival.name,
        original_name_bytes=name_bytes(arrival.item.original_name),
        received_at=arrival.received_at,
        sidecar=arrival.sidecar,
    )


def _describe(prediction: Prediction) -> str:
    flag = " FLAGGED" if prediction.flagged else ""
    return f"{prediction.top_label}, P(melanoma) {prediction.melanoma_score:.3f}{flag}"

