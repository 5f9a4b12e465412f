"""Is the alert firing far more often than its own calibration data said it would?

A camera change, a new kind of patient or a broken lens all show first as a flag rate
that no longer matches the one measured when the threshold was chosen.
"""

from __future__ import annotations

from dermwatch.site.stats import binomial_upper_tail

#: Below this many images a day, even a large excess of flags is too likely by chance to act on.
MIN_IMAGES = 20
#: How unlikely the day's flag count must be under the expected rate before we warn.
P_VALUE = 0.001


def alert_rate(images: int, flagged: int, expected: float | None) -> dict:
    """The day's flag rate against the expected one, as the day's JSON carries it."""
    return {"images": images, "flagged": flagged, "rate": flagged / images if images else None, "expected": expected}


def drift_warning(rate: dict) -> str | None:
    """A plain-words warning when the day's flag rate is far above expected on enough images."""
    images, flagged, expected = rate["images"], rate["flagged"], rate["expected"]
    if expected is None or images < MIN_IMAGES or flagged / images <= expected:
        return None
    if binomial_upper_tail(flagged, images, expected) >= P_VALUE:
        return None
    return (f"the alert flagged {flagged} of {images} images today ({flagged / images:.0%}), far above the "
            f"{expected:.0%} its threshold flagged on its calibration images: check the camera and lighting, "
            "and recalibrate on recent labelled images (dermwatch calibrate)")
