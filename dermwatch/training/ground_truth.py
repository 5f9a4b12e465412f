"""The ISIC 2019 challenge ground truth: diagnosis and lesion id per image id."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dermwatch.errors import DataError

#: ISIC 2019 diagnosis code -> the classes it may mean here. BKL merges pigmented benign
#: keratosis and seborrheic keratosis, so it cannot choose between them.
DIAGNOSIS_CLASSES: dict[str, frozenset[str]] = {
    "MEL": frozenset({"melanoma"}),
    "NV": frozenset({"nevus"}),
    "BCC": frozenset({"basal cell carcinoma"}),
    "AK": frozenset({"actinic keratosis"}),
    "BKL": frozenset({"pigmented benign keratosis", "seborrheic keratosis"}),
    "DF": frozenset({"dermatofibroma"}),
    "VASC": frozenset({"vascular lesion"}),
    "SCC": frozenset({"squamous cell carcinoma"}),
}


@dataclass(frozen=True)
class Truth:
    lesion_id: str  # empty where the archive gives none
    classes: frozenset[str]  # the classes the diagnosis allows; empty for UNK


def load_ground_truth(path: Path) -> dict[str, Truth]:
    """Read ``image,lesion_id,diagnosis,...`` into a map from image id to its truth."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"image", "lesion_id", "diagnosis"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: ground-truth file lacks column(s) {', '.join(sorted(missing))}")
            return {
                row["image"]: Truth(
                    lesion_id=row["lesion_id"].strip(),
                    classes=DIAGNOSIS_CLASSES.get(row["diagnosis"].strip(), frozenset()),
                )
                for row in reader
            }
    except OSError as error:
        raise DataError(f"cannot read ground truth {path}: {error.strerror}") from None
