"""One image, start to end, for both `dermwatch run` and `dermwatch process`.

claim -> in the lanes (one per core, pipeline/lanes.py): read, sha256, decode, classify
-> per batch, one transaction: a sighting for each arrival, a prediction for each image this
model has not seen -> archive; any rejection -> a row with the reason -> quarantine.
Files move out of state/work/ only after their transaction commits, so a crash at any
point is finished by :meth:`Processor.recover` without losing or doubling anything.

One file's fault is that file's fate (quarantine, or a rejection row where it cannot even
be moved); a fault of the disk or the database is raised as :class:`TransientFault` for
the caller to wait out, with the arrivals left in state/work/ to be resumed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dermwatch.config import PathSettings, Settings, check_intake, ensure_folders
from dermwatch.errors import RejectedImage, as_transient
from dermwatch.labels import CLASS_NAMES, MELANOMA
from dermwatch.modelcard import load_card, shipped_model_path
from dermwatch.permissions import process_umask
from dermwatch.pipeline.claim import (
    PLACED_NAME_MAX,
    Claimed,
    ClaimFolders,
    Unmovable,
    archive_name,
    claim,
    new_token,
    place,
    reclaim,
)
from dermwatch.pipeline.classifier import Classifier
from dermwatch.pipeline.decode import read_model_input
from dermwatch.pipeline.lanes import Lanes, open_lanes
from dermwatch.pipeline.names import display_name, fitted_name, name_bytes
from dermwatch.pipeline.regular_file import open_regular
from dermwatch.pipeline.sidecar import read_sidecar
from dermwatch.pipeline.workers import LeaseLost, Membership, cooperative, worker_session_name
from dermwatch.site.threshold import threshold_in_force
from dermwatch.store.db import check_url, ensure_schema, make_engine, session_scope
from dermwatch.store.models import Alert, Image, Prediction, Rejection, Sighting, probability_column, utc_now

log = logging.getLogger(__name__)

# The bulk inserts of a batch go through the tables, not the ORM: half the CPU per row.
IMAGES, PREDICTIONS, SIGHTINGS, ALERTS = Image.__table__, Prediction.__table__, Sighting.__table__, Alert.__table__
#: What a step does when it is not storing: shown if it is held up (watcher/health.py, StallWatch).
IN_A_STEP = "reading, classifying or moving files"
#: How the rejection of a file that could not be moved out of intake begins.
UNMOVABLE = "cannot take it out of the intake folder"
#: Claim tokens looked up in one query when resuming arrivals after a crash.
RECORDED_LOOKUP = 500

@dataclass(frozen=True)
class Outcome:
    """What happened to one arrival."""

    name: str
    status: str  # classified | seen before | rejected
    detail: str  # top label and melanoma score, or the reason


@dataclass
class _Arrival:
    """One claimed file on its way through the lanes and into the database."""

    item: Claimed
    received_at: datetime
    size: int = 0
    sha256: str | None = None
    sidecar: dict[str, str] | None = None
    format: str = ""
    width: int = 0
    height: int = 0
    probabilities: np.ndarray | None = None
    error: Exception | None = None  # why it could not be read, decoded or classified
    # The file or its sidecar could not be read: rejected even when its bytes were seen before.
    unreadable: bool = False

    @property
    def name(self) -> str:
        return display_name(self.item.original_name)


class Processor:
    """Holds what every image needs: folders, database, the lanes that classify, limits."""

    def __init__(self, paths: PathSettings, engine: Engine, lanes: Lanes, max_pixels: int, batch_size: int,
                 alert_channels: tuple[str, ...] = (), zone: ZoneInfo | timezone = timezone.utc,
                 membership: Membership | None = None) -> None:
        self.paths = paths
        self.membership = membership  # PostgreSQL: this process among several workers
        self.alert_channels = alert_channels
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.lanes = lanes
        self.card = lanes.card
        self.max_pixels = max_pixels
        self.batch_size = batch_size  # arrivals stored in one transaction
        self.zone = zone  # archive folders are named by the site's local date
        self.umask = process_umask()
        self.doing = IN_A_STEP  # what holds it up, if something does (watcher/health.py, StallWatch)
        self.unmovable = _unmovable_recorded(engine)  # intake paths recorded as "cannot take it out"
        self.claim_folders = ClaimFolders()

    def tidy(self) -> None:
        """Idle, or about to stop: remove the spare claim folders, and on PostgreSQL this
        worker's folder while it holds no claim."""
        self.claim_folders.drop_spares()
        if self.membership is not None:
            self.membership.tidy()

    def close(self) -> None:
        self.lanes.close()
        self.engine.dispose()

    @contextmanager
    def _recording(self) -> Iterator[Session]:
        """A transaction that records arrivals this worker holds. On PostgreSQL it first
        confirms the worker's lease: one that was silent and taken over records none of them
        (LeaseLost), whatever their fate would have been here."""
        with session_scope(self.sessions) as session:
            if self.membership is not None:
                self.membership.confirm(session)
            yield session

    @contextmanager
    def _doing(self, what: str) -> Iterator[None]:
        self.doing = what
        try:
            yield
        finally:
            self.doing = IN_A_STEP

    @property
    def work_dir(self) -> Path:
        """Where claims go: state/work/, or on PostgreSQL this worker's own folder in it."""
        return self.membership.work_dir if self.membership else self.paths.work

    def claim(self, path: Path) -> Claimed | None:
        """Take ``path`` into state/work/; None if it vanished or cannot be moved (recorded once)."""
        try:
            claimed = claim(path, self.work_dir, self.claim_folders)
        except Unmovable as error:
            self._record_unmovable(path, str(error))
            return None
        if claimed is not None and self.unmovable and display_name(str(path)) in self.unmovable:
            self._withdraw_unmovable(display_name(str(path)))
        return claimed

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
        for start in range(0, len(items), RECORDED_LOOKUP):
            finished, left = _guarded(lambda start=start: self._finish_recorded(items[start : start + RECORDED_LOOKUP]))
            outcomes += finished
            unrecorded += left
        return outcomes + self.process(unrecorded)

    def process(self, items: Iterable[Claimed]) -> list[Outcome]:
        """Read, decode and classify claimed files in the lanes; store them batch by batch."""
        arrivals = (_Arrival(item, utc_now()) for item in items)
        prepared = self.lanes.map(self._prepare, arrivals, ahead=2 * self.batch_size)
        outcomes: list[Outcome] = []
        for batch in _batches(prepared, self.batch_size):
            outcomes += self._settle(batch)
        return outcomes

    def _prepare(self, classifier: Classifier, arrival: _Arrival) -> _Arrival:
        """In a lane: read, hash, decode and classify one arrival; a failure is kept, not raised."""
        try:
            data = self._read(arrival)
        except Exception as error:  # noqa: BLE001 - judged in the service's thread by _blame
            arrival.error, arrival.unreadable = error, True
            return arrival
        try:
            decoded, pixels = read_model_input(data, classifier.input_size, max_pixels=self.max_pixels)
            arrival.format, arrival.width, arrival.height = decoded.format, decoded.width, decoded.height
            arrival.probabilities = classifier.predict(pixels[np.newaxis])[0]
        except Exception as error:  # noqa: BLE001 - judged in the service's thread by _blame
            arrival.error = error
        return arrival

    def _read(self, arrival: _Arrival) -> bytes:
        with open_regular(arrival.item.work_path) as handle:
            data = handle.read()
        arrival.size = len(data)
        arrival.sha256 = hashlib.sha256(data).hexdigest()
        if not data:
            raise RejectedImage("empty file (0 bytes)")
        sidecar_name = display_name(Path(arrival.item.original_name).stem) + ".json"
        arrival.sidecar = read_sidecar(arrival.item.sidecar_path, sidecar_name)
        return data

    def _settle(self, batch: list[_Arrival]) -> list[Outcome]:
        """Reject what could not be read; store the rest together, or one by one if that fails."""
        outcomes = [self._reject(a, _blame(a.error)) for a in batch if a.unreadable]
        return outcomes + self._store([a for a in batch if not a.unreadable])

    def _store(self, arrivals: list[_Arrival]) -> list[Outcome]:
        """Commit the batch, then move its files on; a batch that fails is retried one by one,
        so one arrival's fault is that arrival's fate."""
        if not arrivals:
            return []
        try:
            outcomes, stored, failed = self._commit(arrivals)
        except LeaseLost:
            raise  # taken over while silent: none of this batch is this worker's to record
        except Exception as error:  # noqa: BLE001 - sorted by _blame, after finding whose fault it is
            transient = as_transient(error)
            if transient is not None:
                raise transient from error
            if len(arrivals) > 1:
                return [outcome for arrival in arrivals for outcome in self._store([arrival])]
            if not isinstance(error, IntegrityError):
                return [self._reject(arrivals[0], _blame(error))]
            # Another process (`dermwatch process` beside the service, or another worker) stored
            # the same bytes a moment ago: committed again, this arrival is a sighting of that image.
            try:
                outcomes, stored, failed = self._commit(arrivals)
            except Exception as again:  # noqa: BLE001 - as above
                return [self._reject(arrivals[0], _blame(again))]
        for arrival in stored:
            _guarded(lambda arrival=arrival: self._archive(arrival.item, arrival.sha256, arrival.received_at))
        return outcomes + [self._reject(arrival, _blame(arrival.error)) for arrival in failed]

    def _commit(self, arrivals: list[_Arrival]) -> tuple[list[Outcome], list[_Arrival], list[_Arrival]]:
        """One transaction for the batch, in a few bulk statements: a sighting for each arrival, a
        prediction for each image this model has not classified, the alerts owed.

        Returns the outcomes, the arrivals stored, and those that could not be decoded or
        classified (unless their bytes were classified before). Same bytes twice in one batch
        are classified once.
        """
        card = self.card
        now = utc_now()
        with self._doing(f"storing {len(arrivals)} arrival(s) in the database (locked or unreachable?)"), \
                self._recording() as session:
            # Asked in the same transaction: a site calibration takes effect with the next batch.
            threshold = threshold_in_force(session, card).value
            known = _known_images(session, {a.sha256 for a in arrivals}, card.sha256)
            outcomes: list[Outcome] = []
            stored: list[_Arrival] = []
            failed: list[_Arrival] = []
            new_images: list[_Arrival] = []
            to_predict: list[_Arrival] = []
            for arrival in arrivals:
                image = known.get(arrival.sha256)
                if image is not None and image.verdict is not None:
                    outcomes.append(Outcome(arrival.name, "seen before", image.verdict.describe()))
                    stored.append(arrival)
                    log.info("%s: same bytes as %s, already classified", arrival.name, image.name)
                elif arrival.error is not None:
                    failed.append(arrival)
                else:
                    if image is None:
                        new_images.append(arrival)
                        image = _KnownImage(None, arrival.name, None)
                    image.verdict = _Verdict.of(arrival, threshold)
                    known[arrival.sha256] = image
                    to_predict.append(arrival)
                    outcomes.append(Outcome(arrival.name, "classified", image.verdict.describe()))
                    stored.append(arrival)
                    log.info("%s: %s", arrival.name, outcomes[-1].detail)
            if new_images:
                ids = session.scalars(insert(IMAGES).returning(IMAGES.c.id, sort_by_parameter_order=True),
                                      [self._image_row(a, now) for a in new_images]).all()
                for arrival, image_id in zip(new_images, ids, strict=True):
                    known[arrival.sha256].id = image_id
            if to_predict:
                rows = [self._prediction_row(known[a.sha256], now) for a in to_predict]
                ids = session.scalars(insert(PREDICTIONS).returning(PREDICTIONS.c.id, sort_by_parameter_order=True),
                                      rows).all()
                # Queued in the same transaction: an alert owed is never lost to a crash.
                alerts = [{"prediction_id": prediction_id, "channel": channel, "created_at": now,
                           "next_attempt_at": now}
                          for row, prediction_id in zip(rows, ids, strict=True) if row["flagged"]
                          for channel in self.alert_channels]
                if alerts:
                    session.execute(insert(ALERTS), alerts)
            if stored:
                session.execute(insert(SIGHTINGS), [_sighting_row(known[a.sha256].id, a) for a in stored])
        return outcomes, stored, failed

    def _image_row(self, arrival: _Arrival, now: datetime) -> dict:
        return {
            "sha256": arrival.sha256,
            "original_name": arrival.name,
            "received_at": arrival.received_at,
            "processed_at": now,
            "bytes": arrival.size,
            "format": arrival.format,
            "width": arrival.width,
            "height": arrival.height,
            "archive_path": str(self.archive_target(arrival.item.original_name, arrival.sha256, arrival.received_at)),
        }

    def _prediction_row(self, image: _KnownImage, now: datetime) -> dict:
        verdict = image.verdict
        return {
            "image_id": image.id,
            "model_version": self.card.version,
            "model_sha256": self.card.sha256,
            "created_at": now,
            "top_label": verdict.top_label,
            "melanoma_score": verdict.melanoma_score,
            "threshold": verdict.threshold,
            "flagged": verdict.flagged,
            **{probability_column(label): float(p)
               for label, p in zip(CLASS_NAMES, verdict.probabilities, strict=True)},
        }

    def _finish_recorded(self, items: list[Claimed]) -> tuple[list[Outcome], list[Claimed]]:
        """After a crash: arrivals whose result is committed only need their files moved.
        Returns their outcomes, and the arrivals that still need processing."""
        tokens = [item.token for item in items]
        with self.sessions() as session:
            archived = {claim: (sha256, received_at) for claim, sha256, received_at in session.execute(
                select(Sighting.claim, Image.sha256, Sighting.received_at).join(Sighting.image)
                .where(Sighting.claim.in_(tokens)))}
            rejected = {claim: reason for claim, reason in session.execute(
                select(Rejection.claim, Rejection.reason).where(Rejection.claim.in_(tokens)))}
        outcomes, unrecorded = [], []
        for item in items:
            name = display_name(item.original_name)
            if item.token in archived:
                self._archive(item, *archived[item.token])
                outcomes.append(Outcome(name, "classified", "recovered after restart"))
            elif item.token in rejected:
                self._quarantine(item)
                outcomes.append(Outcome(name, "rejected", rejected[item.token]))
            else:
                unrecorded.append(item)
        return outcomes, unrecorded

    def _reject(self, arrival: _Arrival, reason: str) -> Outcome:
        item = arrival.item
        with self._recording() as session:
            session.add(
                rejection(item.token, item.original_name, reason, self.paths.quarantine / _quarantine_name(item),
                          sha256=arrival.sha256, size=arrival.size if arrival.sha256 else None,
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
        reason = (f"{UNMOVABLE} ({why}); it stays there: give the service's "
                  "user write access to its folder and read access to the file")
        with session_scope(self.sessions) as session:
            known = session.scalar(
                select(Rejection.id).where(Rejection.quarantine_path == shown, Rejection.reason == reason)
                .where(Rejection.bytes.is_(None) if size is None else Rejection.bytes == size)
            )
            if known is None:
                session.add(rejection(new_token(), path.name, reason, shown, size=size))
        self.unmovable.add(shown)
        if known is None:
            log.error("%s: %s", shown, reason)

    def _withdraw_unmovable(self, shown: str) -> None:
        """A file once recorded as unmovable was taken after all (its rights were mended): its
        fate is now the pipeline's, so the old record goes, or the file would count twice."""
        try:
            with session_scope(self.sessions) as session:
                session.execute(delete(Rejection).where(Rejection.quarantine_path == shown,
                                                        Rejection.reason.startswith(UNMOVABLE)))
        except Exception as error:  # noqa: BLE001 - the file is in hand: never lose it over a stale record
            log.warning("%s: taken now, but its earlier record as unmovable stays (%s)", shown, error)
            return
        self.unmovable.discard(shown)
        log.info("%s: taken after all; its record as unmovable is withdrawn", shown)

    def _archive(self, item: Claimed, sha256: str, received_at: datetime) -> None:
        target = self.archive_target(item.original_name, sha256, received_at)
        if item.sidecar_path is not None:
            self._place(item.sidecar_path, target.parent, f"{target.stem}.json")
        self._place(item.work_path, target.parent, target.name)
        self.claim_folders.release(item)

    def _quarantine(self, item: Claimed) -> None:
        name = _quarantine_name(item)
        if item.sidecar_path is not None:
            self._place(item.sidecar_path, self.paths.quarantine, f"{Path(name).stem}.json")
        self._place(item.work_path, self.paths.quarantine, name)
        self.claim_folders.release(item)

    def _place(self, source: Path, folder: Path, name: str) -> None:
        """Move a recorded arrival's file on. One that has left state/work/ meanwhile (deleted
        by hand) cannot be moved, and retrying would hold up every file behind it: said once."""
        try:
            place(source, folder, name, self.umask)
        except FileNotFoundError:
            if os.path.lexists(source):
                raise  # the destination is what is missing
            log.error("%s: gone from %s before it could be moved to %s; its record stays", display_name(name),
                      source.parent, folder)

    def archive_target(self, original_name: str, sha256: str, received_at: datetime) -> Path:
        """archive/YYYY/MM/DD/<sha-prefix>-<name>, by the site's local date of the arrival."""
        day = received_at.astimezone(self.zone).strftime("%Y/%m/%d")
        return self.paths.archive / day / archive_name(sha256, original_name)


def check_settings(settings: Settings, *, create_intake: bool = False) -> None:
    """What can be checked before anything is created, so that a mistake in the settings is one
    line and leaves nothing behind: the model and its card, the database URL's type and driver,
    the intake folder."""
    load_card(settings.model.path or shipped_model_path())
    check_url(settings.database_url)
    check_intake(settings.paths, create=create_intake)


def open_processor(settings: Settings) -> Processor:
    """Create the folders, open the database and load the model: what `run` and `process` share,
    after check_settings.

    On PostgreSQL the processor joins the workers (``processor.membership``) and claims into
    its own folder of state/work/.
    """
    ensure_folders(settings)
    engine = make_engine(settings.database_url, settings.busy_timeout_seconds,
                         session_name=worker_session_name() if cooperative(settings.database_url) else None)
    try:
        ensure_schema(engine)
        lanes = open_lanes(settings.model.path, settings.model.threads)
    except BaseException:
        engine.dispose()
        raise
    membership = Membership(engine, settings.paths.work, settings.worker_lease_seconds) \
        if cooperative(settings.database_url) else None
    return Processor(settings.paths, engine, lanes, settings.max_pixels, settings.model.batch_size,
                     settings.alerts.channels, settings.reports.timezone, membership)


def _unmovable_recorded(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.scalars(select(Rejection.quarantine_path).where(Rejection.reason.startswith(UNMOVABLE))))


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


def _batches(arrivals: Iterator[_Arrival], size: int) -> Iterator[list[_Arrival]]:
    batch: list[_Arrival] = []
    for arrival in arrivals:
        batch.append(arrival)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _quarantine_name(item: Claimed) -> str:
    return fitted_name(f"{item.token}-", item.original_name, PLACED_NAME_MAX)


@dataclass
class _Verdict:
    """What the model said about one image, and whether that is an alert."""

    top_label: str
    melanoma_score: float
    threshold: float
    flagged: bool
    probabilities: tuple[float, ...] = ()

    @classmethod
    def of(cls, arrival: _Arrival, threshold: float) -> _Verdict:
        probabilities = arrival.probabilities
        score = float(probabilities[CLASS_NAMES.index(MELANOMA)])
        return cls(CLASS_NAMES[int(np.argmax(probabilities))], score, threshold, score >= threshold,
                   tuple(float(p) for p in probabilities))

    def describe(self) -> str:
        flag = " FLAGGED" if self.flagged else ""
        return f"{self.top_label}, P(melanoma) {self.melanoma_score:.3f}{flag}"


@dataclass
class _KnownImage:
    id: int | None  # None until inserted
    name: str
    verdict: _Verdict | None  # this model's, if it classified the image


def _known_images(session: Session, sha256s: set[str], model_sha256: str) -> dict[str, _KnownImage]:
    """The stored images among ``sha256s``, each with this model's verdict if there is one."""
    rows = session.execute(
        select(Image.sha256, Image.id, Image.original_name, Prediction.top_label, Prediction.melanoma_score,
               Prediction.threshold, Prediction.flagged)
        .outerjoin(Prediction, (Prediction.image_id == Image.id) & (Prediction.model_sha256 == model_sha256))
        .where(Image.sha256.in_(sha256s))
    )
    return {sha256: _KnownImage(image_id, name, None if label is None else _Verdict(label, score, threshold, flagged))
            for sha256, image_id, name, label, score, threshold, flagged in rows}


def _sighting_row(image_id: int, arrival: _Arrival) -> dict:
    return {
        "image_id": image_id,
        "claim": arrival.item.token,
        "original_name": arrival.name,
        "original_name_bytes": name_bytes(arrival.item.original_name),
        "received_at": arrival.received_at,
        "sidecar": arrival.sidecar,
    }
