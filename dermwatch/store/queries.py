"""Read-only questions the CLI and the service ask the database."""

from __future__ import annotations

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dermwatch.store.models import Alert, Image, Prediction, Rejection, Sighting


def counts(engine: Engine) -> dict[str, int]:
    """Totals for `dermwatch status` and the systemd STATUS line."""
    with engine.connect() as connection:
        def total(query) -> int:
            return int(connection.scalar(query) or 0)

        return {
            "images": total(select(func.count()).select_from(Image)),
            "sightings": total(select(func.count()).select_from(Sighting)),
            "predictions": total(select(func.count()).select_from(Prediction)),
            "flagged": total(select(func.count()).select_from(Prediction).where(Prediction.flagged)),
            "quarantined": total(select(func.count()).select_from(Rejection)),
        }


#: A sha256 prefix shorter than this could match several images by chance in a large archive.
MIN_SHA256_PREFIX = 12


def image_id_by_sha256(session: Session, sha256: str) -> int:
    """The image whose sha256 is or starts with ``sha256``; ValueError saying why not."""
    sha256 = sha256.strip().lower()
    if not _looks_like_sha256(sha256):
        raise ValueError(f"{sha256!r} is not a sha256 (or its first {MIN_SHA256_PREFIX} or more hex digits)")
    found = session.scalars(select(Image.id).where(Image.sha256.startswith(sha256, autoescape=True)).limit(2)).all()
    if not found:
        raise ValueError(f"no image with sha256 {sha256}")
    if len(found) > 1:
        raise ValueError(f"several images have a sha256 starting {sha256}: give more of it")
    return found[0]


def image_id_by_name(session: Session, name: str) -> int:
    """The one image received under file name ``name``; ValueError if none or several."""
    found = set(session.scalars(select(Sighting.image_id).where(Sighting.original_name == name)))
    if not found:
        raise ValueError(f"no image was received as {name!r}")
    if len(found) > 1:
        raise ValueError(f"{len(found)} different images were received as {name!r}: give its sha256 instead")
    return found.pop()


def image_id_by_reference(session: Session, reference: str) -> int:
    """A sha256 (or prefix) if ``reference`` looks like one, else a file name as received."""
    if _looks_like_sha256(reference.lower()):
        return image_id_by_sha256(session, reference)
    return image_id_by_name(session, reference)


def _looks_like_sha256(text: str) -> bool:
    """A lower-case sha256, or enough of its start to name one image."""
    return len(text) >= MIN_SHA256_PREFIX and all(c in "0123456789abcdef" for c in text)


def alert_counts(engine: Engine) -> dict[str, int | str | None]:
    """Alerts not yet sent, how many of those failed their last try, and the newest error."""
    with engine.connect() as connection:
        unsent = select(func.count()).select_from(Alert).where(Alert.sent_at.is_(None))
        failing = Alert.sent_at.is_(None) & Alert.last_error.is_not(None)
        return {
            "alerts_queued": int(connection.scalar(unsent) or 0),
            "alerts_failing": int(connection.scalar(select(func.count()).select_from(Alert).where(failing)) or 0),
            "alert_error": connection.scalar(select(Alert.last_error).where(failing)
                                             .order_by(Alert.next_attempt_at.desc()).limit(1)),
        }
