"""Read-only questions the CLI and the service ask the database."""

from __future__ import annotations

from sqlalchemy import Engine, func, select

from dermwatch.store.models import Image, Prediction, Rejection, Sighting


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
