"""The model card contract: the service refuses a model it cannot use correctly, and applies
the card's colour mode before every inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dermwatch.errors import ModelError
from dermwatch.modelcard import card_path, load_card
from dermwatch.pipeline.classifier import Classifier
from dermwatch.preprocess import normalize_colour, shades_of_grey


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model.tflite"
    shutil.copy(tiny_model, target)
    shutil.copy(card_path(tiny_model), card_path(target))
    return target


def _edit_card(model: Path, **input_fields) -> None:
    document = json.loads(card_path(model).read_text())
    document["input"].update(input_fields)
    card_path(model).write_text(json.dumps(document))


def test_missing_or_foreign_card_is_refused(model_copy: Path) -> None:
    card_path(model_copy).rename(model_copy.with_suffix(".bak"))
    with pytest.raises(ModelError, match="card .* is missing"):
        load_card(model_copy)
    model_copy.with_suffix(".bak").rename(card_path(model_copy))
    model_copy.write_bytes(model_copy.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="the card belongs to another model"):
        load_card(model_copy)


def test_unknown_colour_mode_is_refused(model_copy: Path) -> None:
    _edit_card(model_copy, colour="sepia")
    with pytest.raises(ModelError, match="input colour 'sepia' is not one of as-is, shades-of-grey"):
        load_card(model_copy)


def test_card_without_colour_mode_means_as_is(model_copy: Path) -> None:
    document = json.loads(card_path(model_copy).read_text())
    document["input"].pop("colour", None)
    card_path(model_copy).write_text(json.dumps(document))
    assert load_card(model_copy).colour == "as-is"


def _lesion_like(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([150.0, 110.0, 100.0]) + rng.normal(0, 25, (2, 48, 48, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_shades_of_grey_removes_a_colour_cast_and_keeps_brightness() -> None:
    images = _lesion_like()
    cast = np.clip(images * np.array([1.1, 1.0, 0.8]), 0, 255).astype(np.uint8)  # a warm camera
    normalized, normalized_cast = shades_of_grey(images), shades_of_grey(cast)
    # The same picture under two casts comes out with the same colours (only the overall
    # brightness, which a cast also changes, may differ; rounding aside) ...
    relative = normalized / normalized.mean(), normalized_cast / normalized_cast.mean()
    assert np.abs(relative[0] - relative[1]).max() * 128 < 3
    # ... with neutral illuminant and about the original brightness, image by image.
    for before, after in zip(images, normalized, strict=True):
        norms = np.mean(after.astype(float) ** 6, axis=(0, 1)) ** (1 / 6)
        assert norms.max() - norms.min() < 3
        assert abs(after.mean() - before.mean()) < 0.05 * before.mean()
    np.testing.assert_array_equal(shades_of_grey(images[0]), normalized[0])  # one image == batch row
    assert normalize_colour(images, "as-is") is images
    with pytest.raises(ValueError, match="unknown colour mode"):
        normalize_colour(images, "sepia")


def test_classifier_applies_the_card_colour_mode(model_copy: Path) -> None:
    pixels = np.clip(_lesion_like(1) * np.array([1.2, 1.0, 0.8]), 0, 255).astype(np.uint8)
    pixels = np.concatenate([pixels, pixels])[:, :32, :32]
    as_is = Classifier(model_copy, load_card(model_copy), threads=1)
    expected = as_is.predict(shades_of_grey(pixels))
    _edit_card(model_copy, colour="shades-of-grey")
    normalizing = Classifier(model_copy, load_card(model_copy), threads=1)
    np.testing.assert_allclose(normalizing.predict(pixels), expected, atol=1e-6)
    assert not np.allclose(as_is.predict(pixels), expected, atol=1e-6)
