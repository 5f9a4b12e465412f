"""The one preprocessing step shared by training, evaluation and the service.

The data set was made by squashing whole ISIC frames to 180x180 (aspect ratio not kept),
so every image, full-size or not, is brought to the model the same way: the whole frame,
resized, never cropped. Pixel scaling lives inside the model, so this returns raw RGB bytes.

A model may also ask, in its card, for each image's colour cast to be removed first
(``normalize_colour``); the classifier does that, so every caller gets it alike.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Resampling filter used everywhere an image is resized to the model input.
RESAMPLE = Image.Resampling.BILINEAR
#: Colour handling a model card can name (card "input" -> "colour").
COLOUR_MODES = ("as-is", "shades-of-grey")
#: Minkowski norm of the shades-of-grey illuminant estimate (6 is the usual choice for dermoscopy).
SHADES_OF_GREY_POWER = 6


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Return the whole frame of an RGB image squashed to ``size`` x ``size``, uint8 HxWx3."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def normalize_colour(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Apply a card's colour mode to uint8 pixels (one HxWx3 image or an NxHxWx3 batch)."""
    if mode == "as-is":
        return pixels
    if mode == "shades-of-grey":
        return shades_of_grey(pixels)
    raise ValueError(f"unknown colour mode {mode!r}; choose one of {', '.join(COLOUR_MODES)}")


def shades_of_grey(pixels: np.ndarray) -> np.ndarray:
    """Remove each image's colour cast with the shades-of-grey estimate (Finlayson and Trezzi, 2004).

    Dermatoscopes, cameras and archive eras light and white-balance differently, and in the
    training data camera and diagnosis go together; dividing out each image's own illuminant
    (the p-norm of each channel) leaves the lesion's colours and drops the camera's.
    Brightness is kept: the three channel gains average to one.
    """
    values = pixels.astype(np.float32)
    illuminant = np.mean(values**SHADES_OF_GREY_POWER, axis=(-3, -2), keepdims=True) ** (1 / SHADES_OF_GREY_POWER)
    gains = illuminant.mean(axis=-1, keepdims=True) / np.maximum(illuminant, 1.0)
    return np.clip(np.rint(values * gains), 0, 255).astype(np.uint8)
