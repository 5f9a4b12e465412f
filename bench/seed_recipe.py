"""The notebook's Model 3 recipe, run in dermwatch's harness so it is scored on the same images.

The recipe: isic9/Train as filed (folder labels, duplicates and all), 500 rotated copies per
class written next to the originals (Augmentor: probability 0.7, up to 10 degrees each way),
then a random 80/20 image split (so copies of one photo land on both sides), the seed CNN at
180x180, Adam, 30 epochs, batch 32, no class weights, the last epoch kept.

Its leaky validation accuracy is what the notebook reported; the figures that count are
on the leak-free Test images, which come from the same audit as dermwatch's own model.

    python bench/seed_recipe.py --data ../shared/data/isic9 \\
        --ground-truth ../shared/data/isic_ground_truth.csv --out runs/seed
    dermwatch export runs/seed
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from dermwatch.labels import CLASS_NAMES
from dermwatch.training.audit import Audit, audit, write_manifest
from dermwatch.training.options import TrainOptions
from dermwatch.training.train import train

COPIES_PER_CLASS = 500


def rotated_copies(rows, out_dir: Path, rng: np.random.Generator):
    """Augmentor's rotate(probability=0.7, max_left_rotation=10, max_right_rotation=10)."""
    copies = []
    for label in CLASS_NAMES:
        originals = [r for r in rows if r.folder_label == label]
        for n in range(COPIES_PER_CLASS):
            source = originals[rng.integers(len(originals))]
            image = Image.open(source.path).convert("RGB")
            if rng.random() < 0.7:
                angle = rng.uniform(-10, 10)
                # Rotate, then crop the largest centred square free of corners and resize back.
                rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC)
                side = image.width / (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle))))
                margin = (image.width - side) / 2
                image = rotated.crop((margin, margin, image.width - margin, image.height - margin)).resize(image.size)
            path = out_dir / label / f"{Path(source.path).stem}_copy{n:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, "JPEG", quality=95)
            copies.append(replace(source, path=str(path), sha256="", phash="", dropped="", note="",
                                  lesion_group=f"copy-of:{source.lesion_group}"))
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="isic9 root (Train/ and Test/)")
    parser.add_argument("--ground-truth", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    audited = audit([args.data], args.ground_truth)
    rng = np.random.default_rng(args.seed)
    # As filed: every Train file with its folder label, nothing dropped, nothing resolved.
    as_filed = [replace(r, resolved_label=r.folder_label, dropped="", split="")
                for r in audited.rows if r.origin == "train"]
    pool = as_filed + rotated_copies(as_filed, args.out / "copies", rng)
    for row, draw in zip(pool, rng.random(len(pool)), strict=True):
        row.split = "val" if draw < 0.2 else "train"
    test_rows = [r for r in audited.rows if r.origin == "test"]
    rows = pool + test_rows

    args.out.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, args.out / "manifest.csv")
    options = TrainOptions(arch="seed", input_size=180, epochs=30, batch_size=32, learning_rate=1e-3,
                           seed=args.seed, balance="none", augment=False, schedule="constant", keep_best=False,
                           epoch_images=0, ema=False, label_smoothing=0.0)
    record = train(Audit(rows=rows, findings=[]), args.out, options)
    print(f"leaky validation accuracy (as the notebook measured it): {record['validation']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
