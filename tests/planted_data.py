"""A tiny ISIC-like data set made on the spot, with the real set's defects planted in it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from dermwatch.labels import CLASS_NAMES

# Each class gets its own hue, so a tiny network has something real to learn.
HUES = {label: i * 28 for i, label in enumerate(CLASS_NAMES)}


def lesion_image(path: Path, label: str, seed: int, size: int = 64) -> Path:
    """A blob of the class's hue on skin-coloured noise; different bytes for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    radius = rng.uniform(0.2, 0.35) * size
    centre = rng.uniform(0.4, 0.6, 2) * size
    blob = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 < radius**2
    hsv = np.empty((size, size, 3), dtype=np.uint8)
    hsv[..., 0] = np.where(blob, HUES[label], 15)
    hsv[..., 1] = np.where(blob, 200, 90) + rng.integers(0, 30, (size, size))
    hsv[..., 2] = np.where(blob, 120, 210) + rng.integers(0, 30, (size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hsv, "HSV").convert("RGB").save(path, "JPEG", quality=95)
    return path


def plant_data_set(folder: Path) -> dict[str, Path]:
    """A small data set with every defect the real one has, planted on purpose: its root
    (isic9/ with Train/ and Test/) and its ground-truth CSV."""
    root = folder / "isic9"
    seed = 0
    for label in CLASS_NAMES:
        for _ in range(8):
            seed += 1
            lesion_image(root / "Train" / label / f"ISIC_{seed:07d}.jpg", label, seed)
        for _ in range(2):
            seed += 1
            lesion_image(root / "Test" / label / f"ISIC_{seed:07d}.jpg", label, seed)
    train, test = root / "Train", root / "Test"
    # A twin under two classes that the ground truth settles (it is actinic keratosis) ...
    twin = lesion_image(train / "actinic keratosis" / "ISIC_0100001.jpg", "actinic keratosis", 9001)
    (train / "nevus" / "ISIC_0100001.jpg").write_bytes(twin.read_bytes())
    # ... and one it does not know.
    conflict = lesion_image(train / "melanoma" / "ISIC_0100002.jpg", "melanoma", 9002)
    (train / "seborrheic keratosis" / "ISIC_0100002.jpg").write_bytes(conflict.read_bytes())
    # A stray copy within one class.
    stray = next((train / "actinic keratosis").iterdir())
    (stray.parent / f"{stray.stem}(1).jpg").write_bytes(stray.read_bytes())
    # Two photos of one lesion (ground truth lesion id), and a third in Test: a leak.
    for n, where in ((1, train), (2, train), (3, test)):
        lesion_image(where / "nevus" / f"ISIC_020000{n}.jpg", "nevus", 9100 + n)
    # The same bytes in Train and Test under different labels.
    leak = lesion_image(train / "melanoma" / "ISIC_0300000.jpg", "melanoma", 9200)
    (test / "seborrheic keratosis" / "ISIC_0300000.jpg").write_bytes(leak.read_bytes())
    # A re-encoded copy with different bytes but the same picture.
    near = lesion_image(train / "dermatofibroma" / "ISIC_0400000.jpg", "dermatofibroma", 9300)
    Image.open(near).save(train / "dermatofibroma" / "ISIC_0400001.jpg", "JPEG", quality=80)

    truth = folder / "ground_truth.csv"
    with truth.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "lesion_id", "diagnosis"])
        writer.writerow(["ISIC_0100001", "", "AK"])
        for n in (1, 2, 3):
            writer.writerow([f"ISIC_020000{n}", "HAM_0000042", "NV"])
    return {"root": root, "truth": truth}
