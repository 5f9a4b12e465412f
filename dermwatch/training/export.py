"""Keras -> TFLite (float32, int8 weights with float activations, and full-integer int8),
checked against Keras, with model cards."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dermwatch.labels import CLASS_NAMES
from dermwatch.modelcard import SHIPPED_MODEL_NAME, card_path, load_card, write_card
from dermwatch.pipeline.classifier import Classifier
from dermwatch.preprocess import RESAMPLE, model_view
from dermwatch.training.audit import ManifestRow
from dermwatch.training.calibration import TARGET_SENSITIVITY, WORST_ROOT_RULE, calibrate
from dermwatch.training.card_html import render_card_html
from dermwatch.training.data import load_arrays
from dermwatch.training.evaluate import evaluate_model
from dermwatch.training.metrics import defined, worst_root_threshold
from dermwatch.training.model import load_trained_model

log = logging.getLogger(__name__)

#: Training images used to calibrate int8 ranges.
REPRESENTATIVE_IMAGES = 200


def with_probabilities(model: keras.Model, temperature: float, tta: bool = False) -> keras.Model:
    """Append temperature scaling and softmax, so the exported model returns calibrated probabilities.

    With ``tta`` the logits are averaged over the eight flips and quarter turns of the
    image: dermoscopy has no "up", and the network saw all eight in training.
    """
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    logits = keras.ops.mean(keras.ops.stack([model(view) for view in _dihedral_views(inputs)]), axis=0) \
        if tta else model(inputs)
    scaled = keras.layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    return keras.Model(inputs, keras.layers.Softmax(name="probabilities")(scaled), name=f"{model.name}_calibrated")


def _dihedral_views(images):
    """The eight images of the square's symmetry group: identity, flips, transposes, turns."""
    transposed = keras.ops.transpose(images, (0, 2, 1, 3))
    views = []
    for base in (images, transposed):
        flipped_rows = keras.ops.flip(base, axis=1)
        views += [base, keras.ops.flip(base, axis=2), flipped_rows, keras.ops.flip(flipped_rows, axis=2)]
    return views


#: The TFLite files export writes: float32; "dynamic", int8 weights with float activations
#: (a quarter of the weights' memory, activations quantised per call); and full-integer int8.
QUANTIZATIONS = ("float32", "dynamic", "int8")


@contextlib.contextmanager
def inference_graph(model: keras.Model) -> Iterator[Path]:
    """The model's inference graph (training=False) as a SavedModel in a temporary folder.

    It is what TFLiteConverter.from_keras_model writes, and writes again, for each conversion;
    written once here, the three conversions of an export each start from it (about a third of
    each conversion's time saved).
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name) for tensor in model.inputs]
    archive.add_endpoint("serve", functools.partial(model.__call__, training=False), signature)
    with tempfile.TemporaryDirectory(prefix="dermwatch-export-") as folder:
        archive.write_out(folder, verbose=False)
        yield Path(folder)


def convert(saved_model: Path, representative: np.ndarray | None = None, *, dynamic: bool = False) -> bytes:
    """Float32 TFLite of an inference_graph; int8 weights with float activations when
    ``dynamic``; or full-integer int8 (int8 input and output) when ``representative`` is given."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if dynamic:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: weights only
    elif representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every tensor it saves
        return converter.convert()


def card_document(*, name: str, version: str, input_size: int, melanoma_threshold: float,
                  quantization: str, colour: str = "as-is", crop: str = "whole-frame",
                  **extra: Any) -> dict[str, Any]:
    """The fields the service needs, plus whatever training and evaluation add."""
    return {
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "labels": list(CLASS_NAMES),
        "input": {
            "size": input_size,
            "channels": "RGB",
            "values": "raw pixel values 0-255; the model scales them itself",
            "resize": f"whole frame squashed to {input_size}x{input_size} ({RESAMPLE.name.lower()})"
                      + (", then the square around the lesion resized back to it" if crop == "lesion" else
                         ", never cropped"),
            "colour": colour,
            "crop": crop,
        },
        "output": "calibrated probabilities of the nine labels, in order",
        "quantization": quantization,
        "melanoma_threshold": melanoma_threshold,
        "tensorflow_version": tf.__version__,
        **extra,
    }


def save_tflite(model_bytes: bytes, path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_bytes)
    write_card(path, document)
    return path


def read_manifest(path: Path) -> list[ManifestRow]:
    with path.open(newline="") as handle:
        return [ManifestRow(**row) for row in csv.DictReader(handle)]


def export_run(run_dir: Path, version: str | None = None, tta: bool = False,
               external_roots: tuple[Path, ...] = ()) -> list[Path]:
    """Export a training run's best model as float32, dynamic and int8 TFLite (QUANTIZATIONS)
    with checked cards.

    Each is then scored through LiteRT on validation and Test (see evaluate.py); the
    scores go into its card, next to an HTML rendering of the card. The melanoma threshold
    is chosen on validation for each file, from the probabilities LiteRT computes with it;
    with ``tta`` the temperature is fitted again too, for the averaged logits. External
    roots (another clinic, never trained on) are scored too; nothing is chosen on them.
    """
    record = json.loads((run_dir / "training.json").read_text())
    options = record["options"]
    size = options["input_size"]
    rows = read_manifest(run_dir / "manifest.csv")
    trained = load_trained_model(run_dir / "model.keras")

    rng = np.random.default_rng(options["seed"])
    train_rows = [r for r in rows if r.split == "train"]
    chosen = rng.choice(len(train_rows), min(REPRESENTATIVE_IMAGES, len(train_rows)), replace=False)
    picked = [train_rows[i] for i in chosen]
    colour = options.get("colour", "as-is")  # runs from before colour modes have none
    crop = options.get("crop", "whole-frame")  # nor before crop modes
    representative = model_view(load_arrays(picked, size)[0], colour, crop)
    val_rows = [r for r in rows if r.split == "val"]
    val_images, val_labels = load_arrays(val_rows, size)
    val_normalized = model_view(val_images, colour, crop)  # what the Keras model sees; LiteRT gets raw
    temperature = record["temperature"]
    if tta:
        logits = with_probabilities(trained, 1.0, tta=True).predict(val_normalized.astype(np.float32), verbose=0)
        temperature, _, _ = calibrate(np.log(logits), val_labels)
    keras_model = with_probabilities(trained, temperature, tta=tta)
    reference = keras_model.predict(val_normalized.astype(np.float32), batch_size=64, verbose=0)

    members = f"x{len(record['ensemble_members'])}" if "ensemble_members" in record else ""
    version = version or f"{options['arch']}{size}{members}-{datetime.now(timezone.utc):%Y%m%d}"
    training = {key: record[key] for key in (
        "data_fingerprint", "train_images", "val_images", "best_epoch", "wall_seconds", "threshold_rule",
        "options", "history")}
    training |= {"temperature": temperature, "test_time_augmentation": "mean of 8 flips/turns" if tta else "none",
                 "threshold_rule": WORST_ROOT_RULE}
    training["validation_keras"] = record["validation"]
    for key in ("ensemble_members", "initial_weights"):
        if key in record:
            training[key] = record[key]
    paths = []
    with inference_graph(keras_model) as graph:
        converted = {quantization: convert(graph, representative if quantization == "int8" else None,
                                           dynamic=quantization == "dynamic") for quantization in QUANTIZATIONS}
    for quantization in QUANTIZATIONS:
        path = run_dir / "export" / f"dermwatch-{quantization}.tflite"
        document = card_document(
            name=f"dermwatch-{options['arch']}", version=f"{version}-{quantization}", input_size=size,
            melanoma_threshold=record["melanoma_threshold"], quantization=quantization, colour=colour, crop=crop,
            training=training,
        )
        save_tflite(converted[quantization], path, document)
        val_probabilities = Classifier(path, load_card(path), threads=2).predict(val_images)
        # The threshold is chosen again on what this very file computes: int8 rounding
        # moves probabilities enough to cost sensitivity at the float threshold.
        document["melanoma_threshold"] = worst_root_threshold(val_probabilities, val_labels,
                                                              [r.root for r in val_rows], TARGET_SENSITIVITY)
        check = agreement(val_probabilities, reference)
        document["export_check"] = check
        write_card(path, document)
        document["evaluation"] = evaluate_model(path, rows, external_roots=external_roots)
        write_card_and_html(path, document)
        log.info("%s: %d bytes; top-1 agreement with Keras %.4f, largest probability difference %.4f",
                 path.name, path.stat().st_size, check["top1_agreement"], check["max_probability_difference"])
        paths.append(path)
    return paths


#: Pooled validation figures that rank or classify: quantisation may cost at most a point of each.
RANKING_FIGURES = ("accuracy", "balanced_accuracy", "melanoma_roc_auc", "melanoma_vs_nevus_auc")
#: The alert's operating point, each file at its own threshold: at most two points. The
#: threshold is chosen again for each file at the 90 % quantile of the validation melanomas,
#: where one melanoma's step moves specificity by up to 1.8 points (shipped model, 309
#: melanomas: 0.704 to 0.747 over the six steps around its threshold), so a 1-point bar there
#: judges which melanoma the quantile landed on as much as the rounding.
OPERATING_POINT_FIGURES = ("melanoma_sensitivity", "melanoma_specificity")
#: The largest model file the service can hold within its 150 MiB (issue 21): it keeps one
#: interpreter per core, each with XNNPACK's packed copy of the weights, beside one shared copy
#: of the file. Measured on 2 cores when each interpreter still mapped the file itself:
#: EfficientNet-Lite0 with int8 weights (3.7 MB) peaked at 133 MiB, in float32 (13.4 MB) at
#: 168 MiB, about 3.6 MiB per MB of file; since the file is shared, two of them averaged
#: (7.5 MB) peak at 133 MiB. 8 MB stays within the bar.
MAX_SHIPPED_BYTES = 8_000_000


class NothingToShip(Exception):
    """No exported file both keeps float32's quality and fits the service's memory."""


def choose_shipped(paths: list[Path], tolerance: float = 0.01, operating_tolerance: float = 0.02,
                   max_bytes: int | None = None) -> Path:
    """dynamic (int8 weights, float activations), else int8, if none of its pooled validation
    figures falls more than its tolerance below float32's; else float32. No file larger than
    ``max_bytes`` (default MAX_SHIPPED_BYTES) is chosen.

    dynamic first: its float activations keep it nearer float32, and the service keeps up with
    it (0.89x its floor, issue 21's bar 0.85x); full int8's inference is so short that the
    service's own per-file work weighs more (0.76x), though it needs 12 MiB less.

    Pooled validation (every root's held-out images; 2,328 with 309 melanomas for the shipped
    model), not leak-free Test: Test is reported, never chosen on, and with 16 melanomas one
    image is 6 points of sensitivity, so a 1-point rule there measures luck, not rounding.
    A quantised file holds a quarter of the weights, which the service's memory bar needs for
    EfficientNet-Lite0. Raises NothingToShip, saying why, where no file qualifies.
    """
    max_bytes = MAX_SHIPPED_BYTES if max_bytes is None else max_bytes
    cards = {load_card(p).document["quantization"]: p for p in paths}
    float_figures = load_card(cards["float32"]).document["evaluation"]["sets"]["validation"]
    refusals = []
    for quantization in ("dynamic", "int8"):
        if quantization not in cards:
            continue
        figures = load_card(cards[quantization]).document["evaluation"]["sets"]["validation"]
        losses = {name: float_figures[name] - figures[name] for name in RANKING_FIGURES + OPERATING_POINT_FIGURES
                  if defined(float_figures.get(name)) and defined(figures.get(name))}
        over = {name: loss for name, loss in losses.items()
                if loss > (operating_tolerance if name in OPERATING_POINT_FIGURES else tolerance)}
        size = cards[quantization].stat().st_size
        if over:
            worst = max(over, key=over.get)
            refusals.append(f"{quantization} lost more than its bar on {worst} ({over[worst]:+.3f})")
        elif size > max_bytes:
            refusals.append(f"{quantization} kept float32's figures but is {size:,} bytes")
        else:
            return cards[quantization]
    if cards["float32"].stat().st_size <= max_bytes:
        return cards["float32"]
    raise NothingToShip(
        f"float32 ({cards['float32'].stat().st_size:,} bytes) is larger than the service can hold "
        f"({max_bytes:,}); bars against float32's pooled validation figures: {tolerance:.0%} (ranking), "
        f"{operating_tolerance:.0%} (operating point); {'; '.join(refusals) or 'no quantised file'}. "
        "Review the cards and ship one by hand (training.export.ship), saying why.")


def ship(model_path: Path, models_dir: Path) -> Path:
    """Copy a model, its card and its HTML card into the package as the default model.

    The card of the model it replaces may hold the recipes-over-seeds table (bench/seeds.py
    --card) that the choice was made on: the new card keeps it, unless it has one of its own.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / SHIPPED_MODEL_NAME
    document = load_card(model_path).document
    replaced = card_path(target)
    if "seed_table" not in document and replaced.is_file():
        kept = json.loads(replaced.read_text()).get("seed_table")
        document = document if kept is None else {**document, "seed_table": kept}
    target.write_bytes(model_path.read_bytes())
    write_card_and_html(target, document)
    return target


def write_card_and_html(model_path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as the card of ``model_path`` (sha256 and file name stamped anew), and its HTML."""
    write_card(model_path, document)
    render_card_html(load_card(model_path).document, model_path.with_suffix(".html"))


def agreement(probabilities: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely a converted model follows the Keras model on the same images."""
    return {
        "images": int(len(reference)),
        "top1_agreement": float((probabilities.argmax(1) == reference.argmax(1)).mean()),
        "max_probability_difference": float(np.abs(probabilities - reference).max()),
    }
