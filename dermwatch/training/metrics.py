"""Classification metrics in plain NumPy, shared by training, evaluation and export checks."""

from __future__ import annotations

import math

import numpy as np

from dermwatch.labels import CLASS_NAMES, MELANOMA

MELANOMA_INDEX = CLASS_NAMES.index(MELANOMA)
NEVUS_INDEX = CLASS_NAMES.index("nevus")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int = len(CLASS_NAMES)) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    matrix = confusion(y_true, y_pred)
    support = matrix.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half); nan if one class."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0,0) to (1,1)."""
    order = np.argsort(-score, kind="stable")
    positive = positive.astype(bool)[order]
    distinct = np.r_[np.nonzero(np.diff(score[order]))[0], len(score) - 1]
    tps = np.cumsum(positive)[distinct]
    fps = (distinct + 1) - tps
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    boundaries = np.r_[0, np.nonzero(np.diff(sorted_values))[0] + 1, len(values)]
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        ranks[order[start:stop]] = (start + stop + 1) / 2
    return ranks


def sensitivity_specificity(positive: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    positive, flagged = positive.astype(bool), flagged.astype(bool)
    sensitivity = (flagged & positive).sum() / max(positive.sum(), 1)
    specificity = (~flagged & ~positive).sum() / max((~positive).sum(), 1)
    return float(sensitivity), float(specificity)


def expected_calibration_error(probabilities: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: gap between confidence and accuracy, weighted over equal-width bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def melanoma_threshold(probabilities: np.ndarray, y_true: np.ndarray, sensitivity: float) -> float:
    """Highest P(melanoma) threshold that still flags ``sensitivity`` of the melanomas."""
    scores = np.sort(probabilities[y_true == MELANOMA_INDEX, MELANOMA_INDEX])[::-1]
    if len(scores) == 0:
        raise ValueError("no melanoma among the validation images: cannot choose a threshold")
    needed = int(np.ceil(sensitivity * len(scores)))
    # A hair below the needed score, so that float rounding in another runtime (LiteRT)
    # cannot push that melanoma under the threshold.
    return float(scores[needed - 1]) - 1e-6


#: A root with fewer validation melanomas than this cannot pin a 90 % quantile (with the
#: supplement's 15, one melanoma is 7 points): it counts in the pool, but does not decide alone.
MIN_ROOT_MELANOMAS = 50


def worst_root_threshold(probabilities: np.ndarray, y_true: np.ndarray, roots: list[str],
                         sensitivity: float, min_melanomas: int = MIN_ROOT_MELANOMAS) -> float:
    """The highest threshold that flags ``sensitivity`` of the pooled melanomas and of the
    melanomas of every root that has at least ``min_melanomas`` of them.

    A threshold chosen on pooled validation alone lets the largest root decide, and a camera
    whose melanomas score lower (the HAM10000 cameras did) loses half of them: so each root
    large enough to measure its own sensitivity must reach the target too. A root too small
    to (15 melanomas) made the alert flag 99.7 % of another clinic's nevi when it decided
    alone, on a 90 % quantile one melanoma moves by 7 points.
    """
    root_names = np.array(roots)
    thresholds = [melanoma_threshold(probabilities, y_true, sensitivity)]
    thresholds += [melanoma_threshold(probabilities[root_names == root], y_true[root_names == root], sensitivity)
                   for root in sorted(set(roots))
                   if (y_true[root_names == root] == MELANOMA_INDEX).sum() >= min_melanomas]
    return min(thresholds)


#: The figures that get a bootstrap interval in the card: the ones a decision is made on.
INTERVAL_FIGURES = ("balanced_accuracy", "melanoma_roc_auc", "melanoma_vs_nevus_auc", "melanoma_sensitivity",
                    "melanoma_specificity", "nevus_flag_rate")


def bootstrap_intervals(probabilities: np.ndarray, y_true: np.ndarray, threshold: float, draws: int = 1000,
                        seed: int = 0) -> dict[str, list[float] | None]:
    """Percentile 95 % intervals of INTERVAL_FIGURES over images resampled with replacement.

    On 74 or 242 images one figure is noise without its interval. None where a figure cannot
    be computed on most resamples (a class with no images).
    """
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in INTERVAL_FIGURES}
    for _ in range(draws):
        pick = rng.integers(0, len(y_true), len(y_true))
        figures = _headline(probabilities[pick], y_true[pick], threshold)
        for name in INTERVAL_FIGURES:
            samples[name].append(figures[name])
    intervals = {}
    for name, values in samples.items():
        finite = np.array([v for v in values if np.isfinite(v)])
        intervals[name] = [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] \
            if len(finite) >= draws // 2 else None
    return intervals


def _headline(probabilities: np.ndarray, y_true: np.ndarray, threshold: float) -> dict[str, float]:
    is_melanoma, is_nevus = y_true == MELANOMA_INDEX, y_true == NEVUS_INDEX
    melanocytic = is_melanoma | is_nevus
    flagged = probabilities[:, MELANOMA_INDEX] >= threshold
    sensitivity, specificity = sensitivity_specificity(is_melanoma, flagged)
    return {
        "balanced_accuracy": balanced_accuracy(y_true, probabilities.argmax(axis=1)),
        "melanoma_roc_auc": roc_auc(is_melanoma, probabilities[:, MELANOMA_INDEX]),
        "melanoma_vs_nevus_auc": roc_auc(is_melanoma[melanocytic], probabilities[melanocytic, MELANOMA_INDEX]),
        "melanoma_sensitivity": sensitivity if is_melanoma.any() else float("nan"),
        "melanoma_specificity": specificity if (~is_melanoma).any() else float("nan"),
        "nevus_flag_rate": float(flagged[is_nevus].mean()) if is_nevus.any() else float("nan"),
    }


def summarize(probabilities: np.ndarray, y_true: np.ndarray, threshold: float) -> dict:
    """Every figure the model card reports, for one set of images (with bootstrap intervals)."""
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion(y_true, y_pred)
    per_class = {}
    for index, name in enumerate(CLASS_NAMES):
        tp = matrix[index, index]
        predicted, actual = matrix[:, index].sum(), matrix[index].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(actual)
        }
    is_melanoma, is_nevus = y_true == MELANOMA_INDEX, y_true == NEVUS_INDEX
    melanocytic = is_melanoma | is_nevus
    flagged = probabilities[:, MELANOMA_INDEX] >= threshold
    sensitivity, specificity = sensitivity_specificity(is_melanoma, flagged)
    return {
        "images": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "melanoma_roc_auc": roc_auc(is_melanoma, probabilities[:, MELANOMA_INDEX]),
        # The clinically hard question, melanoma or nevus? The AUC above also counts the easy
        # negatives (here every non-melanocytic class comes from another camera).
        "melanoma_vs_nevus_auc": roc_auc(is_melanoma[melanocytic], probabilities[melanocytic, MELANOMA_INDEX]),
        "melanoma_images": int(is_melanoma.sum()),
        "melanoma_sensitivity": sensitivity,
        "melanoma_specificity": specificity,
        # Benign moles the alert fires on: what a clinic feels first when a threshold does not travel.
        "nevus_flag_rate": float(flagged[is_nevus].mean()) if is_nevus.any() else float("nan"),
        "expected_calibration_error": expected_calibration_error(probabilities, y_true),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "intervals": bootstrap_intervals(probabilities, y_true, threshold),
    }


def defined(value: float | None) -> bool:
    """Whether a figure has a value: a set that lacks a class it needs gives nan (None in
    some cards)."""
    return value is not None and math.isfinite(value)


def figure(metrics: dict, name: str) -> str:
    """'0.690 [0.620–0.750]'; 'n/a' where the set lacks the class; no interval in older cards."""
    value = metrics.get(name)
    if not defined(value):
        return "n/a"
    interval = (metrics.get("intervals") or {}).get(name)
    return f"{value:.3f} [{interval[0]:.3f}–{interval[1]:.3f}]" if interval else f"{value:.3f}"
