"""Score a TFLite model, through the service's own classifier, on validation and Test images.

Three sets side by side: validation (the lesion-grouped split of training data), Test as
published (all of it, published labels), and the leak-free part of Test (no twin and no
other photo of the same lesion in the training folders; labels resolved by ground truth).
Only the last one measures generalisation. External roots (another clinic's images, one
folder per class, never trained on) are scored as ``external:<name>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dermwatch.labels import CLASS_NAMES
from dermwatch.modelcard import load_card
from dermwatch.pipeline.classifier import Classifier
from dermwatch.training.audit import ManifestRow
from dermwatch.training.data import load_arrays
from dermwatch.training.metrics import MELANOMA_INDEX, roc_curve, summarize
from dermwatch.training.scan import scan_roots

log = logging.getLogger(__name__)

SETS = {
    "validation": (("val",), "resolved"),
    "test_published": (("test", "test_leaky"), "folder"),
    "test_leak_free": (("test",), "resolved"),
}


def predict_rows(
    classifier: Classifier, rows: list[ManifestRow], labels: str, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    images, y = load_arrays(rows, classifier.input_size, labels=labels)
    probabilities = np.concatenate(
        [classifier.predict(images[i : i + batch]) for i in range(0, len(images), batch)]
    ) if len(images) else np.zeros((0, len(CLASS_NAMES)), np.float32)
    return probabilities, y


def predict_external(classifier: Classifier, root: Path, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and folder labels for every image of an external class-folder root."""
    files = scan_roots([root])
    rows = [ManifestRow(path=str(f.path), root=f.root, origin=f.origin, image_id=f.image_id, sha256=f.sha256,
                        phash="", folder_label=f.folder_label, resolved_label=f.folder_label,
                        label_source="folder", lesion_group="", split="external", dropped="", note="")
            for f in files]
    return predict_rows(classifier, rows, "folder", batch)


def evaluate_model(model_path: Path, rows: list[ManifestRow], threads: int = 2,
                   external_roots: tuple[Path, ...] = ()) -> dict:
    """Every card metric for each set (and each external root), at the threshold the card ships with."""
    card = load_card(model_path)
    classifier = Classifier(model_path, card, threads)
    results: dict = {"model": card.display, "melanoma_threshold": card.melanoma_threshold, "sets": {}}
    scored = [(name, lambda chosen=chosen, labels=labels: predict_rows(classifier, chosen, labels))
              for name, chosen, labels in evaluation_sets(rows)]
    scored += [(f"external:{root.name}", lambda root=root: predict_external(classifier, root))
               for root in external_roots]
    for name, predict in scored:
        probabilities, y = predict()
        results["sets"][name] = summarize(probabilities, y, card.melanoma_threshold)
        results["sets"][name]["roc_points"] = _roc_points(probabilities, y)
        log.info("%s: %d images, accuracy %.3f, balanced %.3f, melanoma AUC %.3f", name, len(y),
                 results["sets"][name]["accuracy"], results["sets"][name]["balanced_accuracy"],
                 results["sets"][name]["melanoma_roc_auc"])
    return results


def evaluation_sets(rows: list[ManifestRow]) -> list[tuple[str, list[ManifestRow], str]]:
    """(name, rows, label kind) for each set that has images.

    With several data roots, validation is also scored per root ("validation:supplement"):
    a root that is another ISIC collection shows how the model does where melanoma looks
    different from the training folders' melanomas.
    """
    sets = []
    for name, (splits, labels) in SETS.items():
        chosen = [r for r in rows if r.split in splits]
        if chosen:
            sets.append((name, chosen, labels))
    validation = [r for r in rows if r.split == "val"]
    roots = sorted({r.root for r in validation})
    if len(roots) > 1:
        validation_labels = SETS["validation"][1]
        sets += [(f"validation:{root}", [r for r in validation if r.root == root], validation_labels)
                 for root in roots]
    return sets


def _roc_points(probabilities: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    fpr, tpr = roc_curve(y == MELANOMA_INDEX, probabilities[:, MELANOMA_INDEX])
    return {
        "false_positive_rate": [round(float(v), 4) for v in fpr],
        "true_positive_rate": [round(float(v), 4) for v in tpr],
    }
