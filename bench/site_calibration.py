"""Does a site threshold travel from one half of a clinic's photos to the other?

Splits a labelled folder (one subfolder per diagnosis, e.g. ../shared/data/derm7pt) into two
halves, stratified by diagnosis, with each of several seeds. For each split it runs
`dermwatch calibrate HALF_A --sensitivity S` in a fresh installation, then
`dermwatch classify --format csv HALF_B`, and prints sensitivity and specificity on half B at
the site threshold and at the model card's threshold: the check a clinic would do.

    python bench/site_calibration.py --data ../shared/data/derm7pt [--seeds 5] [--sensitivity 0.9]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dermwatch.labels import MELANOMA, parse_diagnosis
from dermwatch.modelcard import load_card, shipped_model_path
from dermwatch.pipeline.claim import iter_candidates


def halves(data: Path, seed: int, root: Path) -> tuple[Path, Path]:
    """root/a and root/b, each with half of every diagnosis folder's images (symlinks)."""
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        diagnosis = parse_diagnosis(folder.name)
        images = list(iter_candidates(folder))
        order = rng.permutation(len(images))
        for rank, index in enumerate(order):
            target = root / ("a" if rank % 2 == 0 else "b") / diagnosis / images[index].name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(images[index].resolve())
    return root / "a", root / "b"


def dermwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermwatch", *args], capture_output=True, text=True, check=True)


def rates(rows: list[dict], threshold: float) -> tuple[float, float]:
    melanoma = np.array(["/melanoma/" in row["path"] for row in rows])
    flagged = np.array([float(row[MELANOMA]) >= threshold for row in rows])
    return float(flagged[melanoma].mean()), float((~flagged[~melanoma]).mean())


def flagged_rates(rows: list[dict]) -> tuple[float, float]:
    """Sensitivity and specificity of classify's own `flagged` column: what a clinic sees."""
    melanoma = np.array(["/melanoma/" in row["path"] for row in rows])
    flagged = np.array([row["flagged"] == "True" for row in rows])
    return float(flagged[melanoma].mean()), float((~flagged[~melanoma]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sensitivity", type=float, default=0.9)
    args = parser.parse_args()
    model = (args.model or shipped_model_path()).resolve()
    card_threshold = load_card(model).melanoma_threshold
    results = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            half_a, half_b = halves(args.data, seed, root)
            config = root / "config.toml"
            config.write_text(f'[model]\npath = "{model}"\nthreads = 2\n')
            dermwatch("calibrate", str(half_a), "--sensitivity", str(args.sensitivity), "--config", str(config))
            status = dermwatch("status", "--json", "--config", str(config)).stdout
            threshold = float(json.loads(status)["threshold"])
            table = dermwatch("classify", "--format", "csv", "--config", str(config), str(half_b)).stdout
            rows = list(csv.DictReader(io.StringIO(table)))
            site, card = flagged_rates(rows), rates(rows, card_threshold)
            results.append((threshold, *site, *card))
            print(f"split {seed}: site threshold {threshold:.4f}: half B sensitivity {site[0]:.3f} specificity "
                  f"{site[1]:.3f} | card threshold {card_threshold:.4f}: sensitivity {card[0]:.3f} "
                  f"specificity {card[1]:.3f}")
    mean, spread = np.mean(results, axis=0), np.std(results, axis=0)
    print(f"mean over {args.seeds} splits (sd): site sensitivity {mean[1]:.3f} ({spread[1]:.3f}), specificity "
          f"{mean[2]:.3f} ({spread[2]:.3f}); card sensitivity {mean[3]:.3f} ({spread[3]:.3f}), specificity "
          f"{mean[4]:.3f} ({spread[4]:.3f})")


if __name__ == "__main__":
    main()
