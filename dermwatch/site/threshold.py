"""The alert threshold in force for a model, and where it came from.

A model card carries a threshold chosen on validation images; a site that calibrates on
its own labelled photos (`dermwatch calibrate`) replaces it for that model. Everything that
flags, reports or alerts asks here, so what is in force is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dermwatch.modelcard import ModelCard
from dermwatch.store.models import SiteThreshold


@dataclass(frozen=True)
class AlertThreshold:
    model_sha256: str  # the model it is in force for
    value: float
    source: str  # starts with "site" once calibrated here, else says it is the model card's
    expected_flag_rate: float | None  # share of images its own calibration data flagged
    validated_at_site: bool


def threshold_in_force(session: Session, card: ModelCard) -> AlertThreshold:
    """The newest site calibration for ``card``'s model, else the card's own threshold."""
    site = session.scalar(
        select(SiteThreshold).where(SiteThreshold.model_sha256 == card.sha256)
        .order_by(SiteThreshold.created_at.desc(), SiteThreshold.id.desc()).limit(1)
    )
    if site is None:
        return unvalidated(card)
    return AlertThreshold(card.sha256, site.threshold, describe_site_threshold(site), site.flag_rate,
                          validated_at_site=True)


def unvalidated(card: ModelCard) -> AlertThreshold:
    """The card's own threshold, for a site that has not calibrated this model."""
    return AlertThreshold(
        card.sha256, card.melanoma_threshold,
        "model card (chosen on validation images; not validated at this site: run dermwatch calibrate)",
        card_flag_rate(card), validated_at_site=False,
    )


def threshold_for(engine: Engine, card: ModelCard) -> AlertThreshold:
    with Session(engine) as session:
        return threshold_in_force(session, card)


def describe_site_threshold(site: SiteThreshold) -> str:
    specificity = "n/a" if site.specificity is None else f"{site.specificity:.2f}"
    return (f"site calibration of {site.created_at:%Y-%m-%d} on {site.images} images ({site.melanomas} melanomas; "
            f"{site.method}): sensitivity {site.sensitivity:.2f}, specificity {specificity}")


def card_flag_rate(card: ModelCard) -> float | None:
    """The share of validation images the card's threshold flags, from its validation figures."""
    validation = card.document.get("evaluation", {}).get("sets", {}).get("validation", {})
    try:
        images, melanomas = int(validation["images"]), int(validation["melanoma_images"])
        flagged_melanomas = validation["melanoma_sensitivity"] * melanomas
        flagged_others = (1.0 - validation["melanoma_specificity"]) * (images - melanomas)
    except (KeyError, TypeError, ValueError):
        return None
    return (flagged_melanomas + flagged_others) / images if images else None
