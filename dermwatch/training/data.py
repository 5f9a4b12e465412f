"""Turn manifest rows into pixel arrays (through the service's own decoder), and what every
batch pipeline shares: balance weights, epoch draws, colour jitter and geometric augmentation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from dermwatch.labels import CLASS_NAMES
from dermwatch.pipeline.decode import read_model_input
from dermwatch.training.audit import TRAINING_MAX_PIXELS, ManifestRow
from dermwatch.training.options import COLOUR_JITTER_NAMES, ZOOM_NAMES, TrainOptions


def load_arrays(rows: list[ManifestRow], input_size: int, *, labels: str = "resolved") -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize ``rows`` exactly as the service does; return (uint8 NxHxWx3, int labels)."""
    images = np.empty((len(rows), input_size, input_size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        _, images[i] = read_model_input(Path(row.path), input_size, max_pixels=TRAINING_MAX_PIXELS)
    names = [row.resolved_label if labels == "resolved" else row.folder_label for row in rows]
    return images, np.array([CLASS_NAMES.index(n) for n in names], dtype=np.int32)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse class frequency, scaled so the average training sample weighs 1."""
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(float)
    weights = np.where(counts > 0, len(labels) / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


#: A root that gives a class fewer images than this share of the class's largest root is
#: weighed as part of that largest root: HAM10000's single actinic keratosis would otherwise
#: carry a third of its class on its own (a per-image weight of about 345), and training diverged.
MIN_ROOT_SHARE = 0.05


def class_and_source_weights(labels: np.ndarray, sources: list[str]) -> np.ndarray:
    """Per-image weights: every class weighs the same, and within a class every data root does.

    When one root supplies most of a class (the supplement's nevi) and another most of a
    rival class (isic9's melanomas), plain class weights let the network tell the classes
    apart by where an image came from. Balancing each (class, root) cell removes that cue
    from the loss. With a single root these are exactly the class weights. A root with only
    a handful of a class's images (under MIN_ROOT_SHARE of its largest root) is weighed with
    that largest root: a few images cannot stand for a camera.
    """
    pairs = list(zip(labels.tolist(), sources, strict=True))
    raw_cells = Counter(pairs)
    largest: dict[int, tuple[int, str]] = {}
    for (label, source), count in sorted(raw_cells.items()):
        if count > largest.get(label, (0, ""))[0]:
            largest[label] = (count, source)
    pairs = [
        (label, largest[label][1] if raw_cells[label, source] < MIN_ROOT_SHARE * largest[label][0] else source)
        for label, source in pairs
    ]
    cells = Counter(pairs)
    roots_per_class = Counter(label for label, _ in cells)
    per_cell = {
        (label, source): len(labels) / (len(roots_per_class) * roots_per_class[label] * count)
        for (label, source), count in cells.items()
    }
    return np.array([per_cell[pair] for pair in pairs], dtype=np.float32)


def balance_weights(labels: np.ndarray, sources: list[str], balance: str) -> np.ndarray:
    """Each training image's weight under a --balance mode, as one array: what drawn epochs draw by.

    "weights" gives each image its class weight, "class-and-source" its (class, root) cell's
    weight; "logit-adjust" and "none" leave every image at one.
    """
    if balance == "weights":
        by_class = class_weights(labels)
        return np.array([by_class[label] for label in labels.tolist()], dtype=np.float32)
    if balance == "class-and-source":
        return class_and_source_weights(labels, sources)
    return np.ones(len(labels), dtype=np.float32)


def class_priors(labels: np.ndarray) -> np.ndarray:
    """Each class's share of ``labels``; a class with no example counts as one, so its log is finite."""
    counts = np.maximum(np.bincount(labels, minlength=len(CLASS_NAMES)), 1).astype(np.float32)
    return counts / counts.sum()


def epoch_draws(weights: np.ndarray, epochs: int, epoch_images: int, seed: int) -> np.ndarray:
    """Which images each epoch trains on: ``epochs`` x ``epoch_images`` indices, drawn with
    replacement, each image as likely as its balance weight makes it.

    Drawing balances the data the way weighting the loss does, in expectation, but lets an
    epoch be as short as wanted: a recipe can then be screened over several seeds in the
    time one full run takes.
    """
    rng = np.random.default_rng(seed)
    return rng.choice(len(weights), size=(epochs, epoch_images), p=weights / weights.sum())


def refuse_weights_with_draws(draws: np.ndarray | None, sample_weights: np.ndarray | None) -> None:
    """Drawn epochs are already balanced by the draw: weighting their loss too would balance twice."""
    if draws is not None and sample_weights is not None:
        raise ValueError("drawn epochs are balanced by the draw: give draws or sample_weights, not both")


@dataclass(frozen=True)
class ColourJitter:
    """How far training moves each image's colours: brightness (added, in 0-255 units),
    contrast, saturation, hue, and a gain per channel (a camera's white balance)."""

    brightness: float
    contrast: tuple[float, float]
    saturation: tuple[float, float]
    hue: float
    channel_gain: float = 0.0


#: "mild" is what every model so far trained with. "strong" moves colour further than cameras
#: differ, so that no colour statistic alone can tell a melanoma's camera from a nevus's.
COLOUR_JITTERS = dict(zip(COLOUR_JITTER_NAMES, (
    ColourJitter(brightness=0.1 * 255, contrast=(0.85, 1.15), saturation=(0.8, 1.2), hue=0.03),
    ColourJitter(brightness=0.2 * 255, contrast=(0.6, 1.4), saturation=(0.3, 1.7), hue=0.08, channel_gain=0.15),
), strict=True))


#: RandomZoom's height factor range for each zoom name (negative zooms in). "mild": about 10 %
#: either way, what models before the 2026-12-06 one trained with. "strong", the default, zooms
#: in up to 2x: another clinic may frame its lesions far tighter than the ISIC cameras
#: (derm7pt's hand-cut crops do), and a network that only saw the lesion small in a wide frame
#: can take size for malignancy.
ZOOM_RANGES = dict(zip(ZOOM_NAMES, ((-0.1, 0.1), (-0.5, 0.1)), strict=True))


def geometric_augmentation(seed: int, zoom: str = TrainOptions.zoom) -> keras.Sequential:
    """Small rotations, zooms and shifts on top of the quarter turns: dermoscopy has no 'up'.
    Keras layers, so the same augmentation runs on every backend."""
    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.05, fill_mode="reflect", seed=seed),
            keras.layers.RandomZoom(ZOOM_RANGES[zoom], fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="reflect", seed=seed + 2),
        ],
        name="geometric_augmentation",
    )
