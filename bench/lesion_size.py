"""Does lesion size tell melanoma from nevus the same way at every source? Per root: the side of
the lesion crop's box (preprocess.lesion_box, as a share of the frame) of melanomas and nevi,
its melanoma-vs-nevus AUC, and how often no box was found or it spans the whole frame.

    python bench/lesion_size.py ../shared/data/isic9/Train ../shared/data/supplement \\
        ../shared/data/ham10000 ../shared/data/derm7pt [--most 1200]

A cue whose AUC flips across sources is one a network can learn at one camera and misapply
at the next; one that points the same way everywhere is not the shortcut.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dermwatch.preprocess import lesion_box
from dermwatch.training.metrics import roc_auc


def evenly_spaced(folder: Path, most: int) -> list[Path]:
    files = sorted(folder.glob("*.jpg"))
    return files[:: max(len(files) // most, 1)]


def box_sides(files: list[Path]) -> np.ndarray:
    """Each image's lesion box side as a share of its shorter side; 1.0 where no lesion box is found."""
    sides = []
    for path in files:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        box = lesion_box(pixels)
        sides.append(1.0 if box is None else box[2] / min(pixels.shape[:2]))
    return np.array(sides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+", help="folders with melanoma/ and nevus/ subfolders")
    parser.add_argument("--most", type=int, default=1200,
                        help="thin each class and root to about this many images (every k-th, k = count // MOST)")
    args = parser.parse_args()
    print("| root | melanomas | nevi | box side, melanoma | box side, nevus | AUC | whole frame, melanoma "
          "| whole frame, nevus |")
    print("|---|---|---|---|---|---|---|---|")
    for root in args.roots:
        melanoma, nevus = (box_sides(evenly_spaced(root / label, args.most)) for label in ("melanoma", "nevus"))
        scores = np.concatenate([melanoma, nevus])
        truth = np.concatenate([np.ones(len(melanoma), bool), np.zeros(len(nevus), bool)])
        print(f"| {root} | {len(melanoma)} | {len(nevus)} | {melanoma.mean():.3f} | {nevus.mean():.3f} | "
              f"{roc_auc(truth, scores):.3f} | {(melanoma == 1).mean():.2f} | {(nevus == 1).mean():.2f} |")


if __name__ == "__main__":
    main()
