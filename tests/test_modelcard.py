"""The model card contract: the service refuses a model it cannot use correctly, and applies
the card's crop and colour modes before every inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermwatch.errors import ModelError
from dermwatch.modelcard import card_path, load_card
from dermwatch.pipeline.classifier import Classifier
from dermwatch.preprocess import (
    crop_frame,
    lesion_box,
    lesion_crop,
    luminance,
    model_view,
    normalize_colour,
    shades_of_grey,
)


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


def test_luminance_leaves_shape_and_drops_colour() -> None:
    images = _lesion_like()
    grey = luminance(images)
    assert grey.shape == images.shape and grey.dtype == np.uint8
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # Pillow's own luma (ITU-R BT.601), within its rounding.
    pillow = np.asarray(Image.fromarray(images[0]).convert("L"), dtype=np.int16)
    assert np.abs(grey[0, ..., 0].astype(np.int16) - pillow).max() <= 1
    # A saturated and a washed-out copy of one picture with the same luma come out alike.
    red, teal = np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8)
    red[..., 0] = 200  # luma 59.8
    teal[..., 1], teal[..., 2] = 60, 216  # luma 35.2 + 24.6 = 59.8
    np.testing.assert_array_equal(luminance(red), luminance(teal))
    np.testing.assert_array_equal(model_view(images, "luminance", "whole-frame"), grey)


def test_classifier_applies_the_card_colour_mode(model_copy: Path) -> None:
    pixels = np.clip(_lesion_like(1) * np.array([1.2, 1.0, 0.8]), 0, 255).astype(np.uint8)
    pixels = np.concatenate([pixels, pixels])[:, :32, :32]
    as_is = Classifier(model_copy, load_card(model_copy), threads=1)
    expected = as_is.predict(shades_of_grey(pixels))
    _edit_card(model_copy, colour="shades-of-grey")
    normalizing = Classifier(model_copy, load_card(model_copy), threads=1)
    np.testing.assert_allclose(normalizing.predict(pixels), expected, atol=1e-6)
    assert not np.allclose(as_is.predict(pixels), expected, atol=1e-6)


def test_unknown_crop_mode_is_refused_and_no_crop_means_the_whole_frame(model_copy: Path) -> None:
    assert load_card(model_copy).crop == "whole-frame"  # the tiny model's card predates crop modes
    _edit_card(model_copy, crop="tight")
    with pytest.raises(ModelError, match="input crop 'tight' is not one of whole-frame, lesion"):
        load_card(model_copy)


def _scope_photo(centre: tuple[int, int], radius: int, side: int = 128) -> np.ndarray:
    """Skin in a round scope (black outside, a dim vignette towards its rim) with one dark lesion."""
    rows, columns = np.mgrid[:side, :side]
    from_middle = np.hypot(rows - (side - 1) / 2, columns - (side - 1) / 2)
    skin = np.array([200.0, 170.0, 160.0]) * (1 - 0.35 * (from_middle / (side / 2)) ** 2)[..., None]
    photo = np.where((from_middle > side / 2 - 2)[..., None], 5.0, skin)
    lesion = np.hypot(rows - centre[0], columns - centre[1]) < radius
    photo[lesion] = [90, 60, 50]
    return np.clip(photo, 0, 255).astype(np.uint8)


def test_the_lesion_crop_cuts_to_the_lesion_and_leaves_a_plain_frame_alone() -> None:
    photo = _scope_photo(centre=(80, 45), radius=12)
    top, left, side = lesion_box(photo)
    assert side < 0.6 * 128  # much tighter than the frame: neither the rim nor the vignette was taken for it
    assert top <= 80 - 12 and top + side >= 80 + 12 and left <= 45 - 12 and left + side >= 45 + 12
    cropped = lesion_crop(photo)
    assert cropped.shape == photo.shape and cropped.dtype == np.uint8
    def lesion_share(image: np.ndarray) -> float:
        luminance = image.mean(axis=-1)
        return float(((luminance > 40) & (luminance < 100)).mean())  # darker than skin, lighter than the scope

    assert lesion_share(cropped) > 3 * lesion_share(photo)
    plain = np.full((128, 128, 3), 170, np.uint8)
    assert lesion_box(plain) is None and lesion_crop(plain) is plain
    batch = np.stack([photo, plain])
    np.testing.assert_array_equal(crop_frame(batch, "lesion"), np.stack([cropped, plain]))
    assert crop_frame(batch, "whole-frame") is batch
    with pytest.raises(ValueError, match="unknown crop mode"):
        crop_frame(batch, "tight")
    np.testing.assert_array_equal(model_view(batch, "shades-of-grey", "lesion"),
                                  shades_of_grey(crop_frame(batch, "lesion")))


def test_classifier_applies_the_card_crop_mode(model_copy: Path) -> None:
    from PIL import Image

    pixels = np.stack([np.asarray(Image.fromarray(_scope_photo((80, 45), 12)).resize((32, 32)))] * 2)
    whole = Classifier(model_copy, load_card(model_copy), threads=1)
    expected = whole.predict(crop_frame(pixels, "lesion"))
    _edit_card(model_copy, crop="lesion")
    cropping = Classifier(model_copy, load_card(model_copy), threads=1)
    np.testing.assert_allclose(cropping.predict(pixels), expected, atol=1e-6)
    assert not np.allclose(whole.predict(pixels), expected, atol=1e-6)
