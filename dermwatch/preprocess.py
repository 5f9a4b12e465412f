"""The one preprocessing step shared by training, evaluation and the service.

The data set was made by squashing whole ISIC frames to 180x180 (aspect ratio not kept),
so every image, full-size or not, is brought to the model the same way: the whole frame,
resized, never cropped. Pixel scaling lives inside the model, so this returns raw RGB bytes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Resampling filter used everywhere an image is resized to the model input.
RESAMPLE = Image.Resampling.BILINEAR


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Return the whole frame of an RGB image squashed to ``size`` x ``size``, uint8 HxWx3."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)
