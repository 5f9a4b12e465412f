"""Fit the alert threshold to a site: the highest P(melanoma) that still flags the asked share
of the site's own melanomas, with bootstrap intervals for what it does there."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dermwatch.errors import DataError
from dermwatch.modelcard import ModelCard
from dermwatch.site.stats import binomial_upper_tail
from dermwatch.store.models import SiteThreshold, utc_now

#: Fewer melanomas than this cannot say whether an alert finds 90 % of them: with 9, one
#: missed melanoma moves sensitivity by 11 points.
MIN_MELANOMAS = 10
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} (95% CI {self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class ThresholdFit:
    threshold: float
    target_sensitivity: float
    images: int
    melanomas: int
    sensitivity: Interval
    specificity: Interval | None  # None: no image other than melanoma
    flag_rate: float


def fit_threshold(melanoma_scores: np.ndarray, is_melanoma: np.ndarray, target: float,
                  seed: int = 0) -> ThresholdFit:
    """The highest threshold expected to flag ``target`` of this site's melanomas, new ones included.

    Flagging exactly ``target`` of the calibration melanomas falls short on new photos: the
    k-th highest of m scores is above, on average, only k/(m+1) of new melanoma scores, and
    on 200 random halves of derm7pt that rule found 0.885 of the other half's melanomas when
    0.90 was asked. So k is the smallest number of melanomas to flag for which new photos
    reach ``target`` at least as often as not (the k-th highest of m scores lies below a
    share ``target`` of new ones exactly when Binomial(m, target) >= k). Flagged means
    score >= threshold.

    The intervals resample melanomas and other images separately (their counts stay as
    measured) and hold the threshold fixed: they say how sure these images make the figures,
    not how the threshold itself would move on other images.
    """
    if not 0.0 < target <= 1.0:
        raise DataError(f"sensitivity {target} must be in (0, 1]")
    scores, positive = np.asarray(melanoma_scores, float), np.asarray(is_melanoma, bool)
    melanomas = int(positive.sum())
    require_melanomas(melanomas)
    needed = melanomas_to_flag(melanomas, target)
    threshold = float(np.sort(scores[positive])[::-1][needed - 1])
    flagged = scores >= threshold
    rng = np.random.default_rng(seed)
    return ThresholdFit(
        threshold=threshold,
        target_sensitivity=target,
        images=len(scores),
        melanomas=melanomas,
        sensitivity=_bootstrapped(flagged[positive], rng),
        specificity=_bootstrapped(~flagged[~positive], rng) if (~positive).any() else None,
        flag_rate=float(flagged.mean()),
    )


def melanomas_to_flag(melanomas: int, target: float) -> int:
    """How many of ``melanomas`` calibration melanomas the threshold must flag (see fit_threshold)."""
    for needed in range(math.ceil(target * melanomas - 1e-9), melanomas + 1):
        if binomial_upper_tail(needed, melanomas, target) <= 0.5:
            return needed
    return melanomas


def require_melanomas(melanomas: int) -> None:
    if melanomas < MIN_MELANOMAS:
        raise DataError(f"only {melanomas} melanoma image(s) to calibrate on; at least {MIN_MELANOMAS} are needed "
                        "for a sensitivity that means anything")


def _bootstrapped(hits: np.ndarray, rng: np.random.Generator) -> Interval:
    """The share of ``hits`` that are true, with a percentile bootstrap 95 % interval."""
    draws = rng.integers(0, len(hits), size=(BOOTSTRAP_DRAWS, len(hits)))
    shares = hits[draws].mean(axis=1)
    low, high = np.percentile(shares, [2.5, 97.5])
    return Interval(float(hits.mean()), float(low), float(high))


def record_fit(engine: Engine, card: ModelCard, fit: ThresholdFit, *, method: str, source: str) -> SiteThreshold:
    """Store ``fit`` as the site threshold for ``card``'s model; earlier ones stay as history."""
    specificity = fit.specificity
    row = SiteThreshold(
        model_sha256=card.sha256, created_at=utc_now(), threshold=fit.threshold,
        target_sensitivity=fit.target_sensitivity, method=method, source=source,
        images=fit.images, melanomas=fit.melanomas,
        sensitivity=fit.sensitivity.value, sensitivity_low=fit.sensitivity.low,
        sensitivity_high=fit.sensitivity.high,
        specificity=specificity.value if specificity else None,
        specificity_low=specificity.low if specificity else None,
        specificity_high=specificity.high if specificity else None,
        flag_rate=fit.flag_rate,
    )
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add(row)
    return row
