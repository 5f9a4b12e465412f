"""How well a training run tells melanoma from nevus on its own training images, per data root,
next to its validation images: does a weak source fail to generalise, or fail to be learned?

    python bench/fit_by_source.py runs/screen/base-s0 [--most 1500]

Scores the run's Keras model (before export) on every melanoma and nevus of each split and
root in its manifest, with the run's own crop and colour modes, without augmentation. A
root whose training AUC is high and validation AUC low is memorised; one that is low on
both is beyond what the network learned at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dermwatch.preprocess import model_view
from dermwatch.training.calibration import softmax
from dermwatch.training.data import load_arrays
from dermwatch.training.export import read_manifest
from dermwatch.training.metrics import MELANOMA_INDEX, roc_auc
from dermwatch.training.model import load_trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--most", type=int, default=1500,
                        help="thin each split and root to about this many images (every k-th, k = count // MOST)")
    args = parser.parse_args()
    options = json.loads((args.run_dir / "training.json").read_text())["options"]
    rows = read_manifest(args.run_dir / "manifest.csv")
    model = load_trained_model(args.run_dir / "model.keras")
    print("| split | root | melanomas | nevi | melanoma vs nevus AUC |\n|---|---|---|---|---|")
    pigmented = [r for r in rows if r.resolved_label in ("melanoma", "nevus")]
    for split in ("train", "val"):
        for root in sorted({r.root for r in rows}):
            chosen = [r for r in pigmented if r.split == split and r.root == root]
            chosen = chosen[:: max(len(chosen) // args.most, 1)]
            if not chosen:
                continue
            images, labels = load_arrays(chosen, options["input_size"])
            view = model_view(images, options.get("colour", "as-is"), options.get("crop", "whole-frame"))
            logits = model.predict(view.astype(np.float32), batch_size=128, verbose=0)
            melanoma = labels == MELANOMA_INDEX
            auc = roc_auc(melanoma, softmax(logits)[:, MELANOMA_INDEX])
            print(f"| {split} | {root} | {melanoma.sum()} | {(~melanoma).sum()} | {auc:.3f} |")


if __name__ == "__main__":
    main()
