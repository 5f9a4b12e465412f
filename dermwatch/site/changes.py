"""What a report shows of the site beyond its images, as one value: the threshold in force, the
confirmed outcomes and the reviews. The service compares it between rounds, so a calibration,
an outcome import or a review reaches today's report without waiting for a new image."""

from __future__ import annotations

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dermwatch.modelcard import ModelCard
from dermwatch.site.threshold import threshold_in_force
from dermwatch.store.models import ConfirmedDiagnosis, Review


def site_state(engine: Engine, card: ModelCard | None) -> tuple:
    """Equal between two calls exactly when nothing the report shows of the site has changed."""
    with Session(engine) as session:
        threshold = threshold_in_force(session, card) if card is not None else None
        outcomes = session.execute(select(func.count(), func.max(ConfirmedDiagnosis.recorded_at))).one()
        reviews = session.execute(select(func.count(), func.max(Review.reviewed_at))).one()
    return (threshold and (threshold.value, threshold.source), tuple(outcomes), tuple(reviews))
