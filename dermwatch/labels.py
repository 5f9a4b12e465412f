"""The nine diagnoses, in the order every model and report uses."""

from __future__ import annotations

from typing import Final

#: Class names exactly as the ISIC 9-class data set names its folders; the model's
#: output order.
CLASS_NAMES: Final[tuple[str, ...]] = (
    "actinic keratosis",
    "basal cell carcinoma",
    "dermatofibroma",
    "melanoma",
    "nevus",
    "pigmented benign keratosis",
    "seborrheic keratosis",
    "squamous cell carcinoma",
    "vascular lesion",
)

MELANOMA: Final = "melanoma"

#: Malignant or pre-malignant classes, listed before benign ones in reports.
MALIGNANT: Final[frozenset[str]] = frozenset(
    {"melanoma", "basal cell carcinoma", "squamous cell carcinoma", "actinic keratosis"}
)


def display_name(label: str) -> str:
    """Human-readable form of a class name ("basal cell carcinoma" -> "Basal cell carcinoma")."""
    return label[:1].upper() + label[1:]


def parse_diagnosis(text: str) -> str:
    """A class name from a folder name or a CSV cell: case, underscores and spaces forgiven.

    Raises ValueError naming the accepted names, so that a typo is never read as "no label".
    """
    name = " ".join(text.replace("_", " ").split()).lower()
    if name not in CLASS_NAMES:
        raise ValueError(f"{text!r} is not one of the nine diagnoses ({', '.join(CLASS_NAMES)})")
    return name
