"""Who looked at which flagged image, and when: the report shows the flags nobody has seen."""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dermwatch.store.models import Review, utc_now
from dermwatch.store.queries import image_id_by_reference


def mark_reviewed(engine: Engine, references: tuple[str, ...], reviewer: str) -> tuple[int, list[str]]:
    """Record ``reviewer`` for each referenced image (sha256, its prefix, or name as received).

    Returns how many were marked and what was wrong with the others. Marking an image again
    keeps the first review: the question the report answers is "has anyone looked?".
    """
    marked, problems = 0, []
    with Session(engine) as session, session.begin():
        for reference in references:
            try:
                image_id = image_id_by_reference(session, reference)
            except ValueError as error:
                problems.append(str(error))
                continue
            if session.scalar(select(Review.id).where(Review.image_id == image_id)) is None:
                session.add(Review(image_id=image_id, reviewer=reviewer, reviewed_at=utc_now()))
                session.flush()
            marked += 1
    return marked, problems
