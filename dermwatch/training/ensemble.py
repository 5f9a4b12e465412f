"""Average several training runs of one recipe into one model: a seed ensemble.

Seeds of one recipe disagree most where the data say least (one source's melanomas), and
their average is steadier than any one of them. The members must share the lesion-grouped
split (`train --split-seed`), so the ensemble's validation images are unseen by every
member, and the input size and the card's crop and colour modes, so one input feeds all.
The result is a training run folder like any other: `dermwatch export` converts, checks
and scores it. Its cost per image is the members' added up.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import keras
import numpy as np

from dermwatch.errors import DataError
from dermwatch.preprocess import model_view
from dermwatch.training.calibration import THRESHOLD_RULE, calibrate
from dermwatch.training.data import load_arrays
from dermwatch.training.export import read_manifest
from dermwatch.training.metrics import summarize
from dermwatch.training.model import load_trained_model

log = logging.getLogger(__name__)

#: What every member must have in common for one input to feed them all and one split to judge them.
SHARED_OPTIONS = ("input_size", "colour", "crop")


def average_logits(members: list[keras.Model], input_size: int) -> keras.Model:
    """One model whose logits are the mean of the members' logits."""
    pixels = keras.Input((input_size, input_size, 3), name="pixels")
    logits = [keras.Model(member.inputs, member.output, name=f"member_{i}")(pixels)
              for i, member in enumerate(members)]
    return keras.Model(pixels, keras.layers.Average(name="mean_logits")(logits), name="ensemble")


def ensemble_run(run_dirs: list[Path], out_dir: Path) -> dict:
    """Write a run folder in ``out_dir`` holding the members' average, calibrated on validation."""
    if len(run_dirs) < 2:
        raise DataError("an ensemble needs at least two training runs")
    records = [json.loads((run_dir / "training.json").read_text()) for run_dir in run_dirs]
    first = records[0]
    for run_dir, record in zip(run_dirs[1:], records[1:], strict=True):
        if record["data_fingerprint"] != first["data_fingerprint"]:
            raise DataError(f"{run_dir} was trained on another split or other data than {run_dirs[0]}: members "
                            "must share one split (train them with the same --split-seed and --data)")
        for key in SHARED_OPTIONS:
            if record["options"].get(key) != first["options"].get(key):
                raise DataError(f"{run_dir} has {key} {record['options'].get(key)!r}, {run_dirs[0]} "
                                f"{first['options'].get(key)!r}: one input cannot feed both")
    options = first["options"]
    size = options["input_size"]
    model = average_logits([load_trained_model(run_dir / "model.keras") for run_dir in run_dirs], size)

    rows = read_manifest(run_dirs[0] / "manifest.csv")
    val_images, val_labels = load_arrays([r for r in rows if r.split == "val"], size)
    view = model_view(val_images, options.get("colour", "as-is"), options.get("crop", "whole-frame"))
    logits = model.predict(view.astype(np.float32), batch_size=64, verbose=0)
    temperature, threshold, probabilities = calibrate(logits, val_labels)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "model.keras")
    for name in ("manifest.csv", "audit.txt"):
        shutil.copyfile(run_dirs[0] / name, out_dir / name)
    record = {
        "options": options,
        "ensemble_members": [{"run": str(run_dir), "seed": record["options"]["seed"],
                              "best_epoch": record["best_epoch"], "wall_seconds": record["wall_seconds"]}
                             for run_dir, record in zip(run_dirs, records, strict=True)],
        "keras_backend": first.get("keras_backend", "tensorflow"),
        "data_fingerprint": first["data_fingerprint"],
        "train_images": first["train_images"],
        "val_images": first["val_images"],
        "best_epoch": [record["best_epoch"] for record in records],
        "wall_seconds": sum(record["wall_seconds"] for record in records),
        "temperature": temperature,
        "melanoma_threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "validation": summarize(probabilities, val_labels, threshold),
        "history": [],
    }
    if "initial_weights" in first:  # one recipe: every member started from the same weights
        record["initial_weights"] = first["initial_weights"]
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    log.info("ensemble of %d runs: temperature %.2f, melanoma threshold %.3f", len(run_dirs), temperature, threshold)
    return record
