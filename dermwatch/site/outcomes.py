"""Confirmed diagnoses (biopsy or clinical) of images the service classified, and what they
say about the alert: how many melanomas it flagged, and how many of its flags were melanoma."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dermwatch.labels import MELANOMA, parse_diagnosis
from dermwatch.site.tables import read_table
from dermwatch.store.models import ConfirmedDiagnosis, Prediction, utc_now
from dermwatch.store.queries import image_id_by_name, image_id_by_sha256


@dataclass
class ImportResult:
    recorded: int = 0
    changed: int = 0
    unchanged: int = 0
    unknown: list[str] = field(default_factory=list)  # "line N: what is wrong"


def import_outcomes(engine: Engine, table: Path) -> ImportResult:
    """Record each row's diagnosis for its image; importing the same file again changes nothing.

    A row names its image by ``sha256`` or by ``file_name`` as received. A row that matches
    no image, or a name under which different images arrived, is listed, never guessed.
    """
    rows = read_table(table, "file_name,diagnosis (or sha256,diagnosis)",
                      lambda header: "diagnosis" in header and bool(header & {"file_name", "sha256"}))
    result = ImportResult()
    with Session(engine) as session, session.begin():
        for line, row in rows:
            try:
                diagnosis = parse_diagnosis(row.get("diagnosis") or "")
                image_id = _image_of(session, row)
            except ValueError as error:
                result.unknown.append(f"line {line}: {error}")
                continue
            known = session.scalar(select(ConfirmedDiagnosis).where(ConfirmedDiagnosis.image_id == image_id))
            if known is None:
                session.add(ConfirmedDiagnosis(image_id=image_id, diagnosis=diagnosis, recorded_at=utc_now(),
                                               source=table.name))
                session.flush()  # a second row for the same image in this file finds this one
                result.recorded += 1
            elif known.diagnosis == diagnosis:
                result.unchanged += 1
            else:
                known.diagnosis, known.recorded_at, known.source = diagnosis, utc_now(), table.name
                result.changed += 1
    return result


def _image_of(session: Session, row: dict[str, str]) -> int:
    sha256 = (row.get("sha256") or "").strip()
    return image_id_by_sha256(session, sha256) if sha256 else image_id_by_name(session, row.get("file_name") or "")


def outcome_summary(engine: Engine) -> dict:
    """Every confirmed diagnosis to date against the alert given at the time (the newest prediction)."""
    with Session(engine) as session:
        confirmed = session.execute(select(ConfirmedDiagnosis.image_id, ConfirmedDiagnosis.diagnosis)).all()
        flagged = dict(session.execute(
            select(Prediction.image_id, Prediction.flagged)
            .where(Prediction.image_id.in_([image_id for image_id, _ in confirmed]))
            .order_by(Prediction.created_at, Prediction.id)
        ).all())  # later rows overwrite earlier: the newest prediction wins
    melanomas = [image_id for image_id, diagnosis in confirmed if diagnosis == MELANOMA]
    melanoma_flagged = sum(bool(flagged.get(image_id)) for image_id in melanomas)
    flagged_confirmed = sum(bool(flagged.get(image_id)) for image_id, _ in confirmed)
    return {
        "confirmed": len(confirmed),
        "melanoma": len(melanomas),
        "melanoma_flagged": melanoma_flagged,
        "flagged": flagged_confirmed,
        "sensitivity": melanoma_flagged / len(melanomas) if melanomas else None,
        "ppv": melanoma_flagged / flagged_confirmed if flagged_confirmed else None,
    }
