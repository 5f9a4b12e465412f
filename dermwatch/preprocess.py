"""The one preprocessing step shared by training, evaluation and the service.

The data set was made by squashing whole ISIC frames to 180x180 (aspect ratio not kept),
so every image, full-size or not, is brought to the model the same way: the whole frame,
resized. Pixel scaling lives inside the model, so this returns raw RGB bytes.

A model may also ask, in its card, for the square around the lesion (``crop``) and for
each image's colour cast to be removed, or its colour left out (``colour``). Both work on the model-input pixels,
in :func:`model_view`, which training, export and the classifier all call: every caller
gets them alike, and a full-size photo is cut no sharper than a training image was.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

#: Resampling filter used everywhere an image is resized to the model input.
RESAMPLE = Image.Resampling.BILINEAR
#: Colour handling a model card can name (card "input" -> "colour").
COLOUR_MODES = ("as-is", "shades-of-grey", "luminance")
#: Minkowski norm of the shades-of-grey illuminant estimate (6 is the usual choice for dermoscopy).
SHADES_OF_GREY_POWER = 6
#: Framing a model card can name (card "input" -> "crop").
CROP_MODES = ("whole-frame", "lesion")
#: Darker than this (mean of R, G, B) is the dermatoscope's black surround, not skin or lesion.
SURROUND_LUMINANCE = 40
#: Side of the thumbnail the lesion is looked for on: the box is coarse, and this keeps it cheap.
BOX_SIDE = 64
#: The scope's dim rim: skin this close to its black surround (share of the side) is not searched.
RIM_SHARE = 0.06
#: Room left around the lesion's box, as a share of the box's side, on each side.
LESION_MARGIN = 0.15
#: The crop's side is never less than this share of the frame's: a small lesion keeps some skin around it.
MIN_CROP_SHARE = 0.4
#: A lesion pixel is at least this much darker (a share) than the skin around it.
MIN_LESION_CONTRAST = 0.12


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Return the whole frame of an RGB image squashed to ``size`` x ``size``, uint8 HxWx3."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def model_view(pixels: np.ndarray, colour: str, crop: str) -> np.ndarray:
    """What the network sees of uint8 model-input pixels (HxWx3 or NxHxWx3): the card's crop, then its colour mode."""
    return normalize_colour(crop_frame(pixels, crop), colour)


def crop_frame(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Apply a card's crop mode to uint8 pixels (one HxWx3 image or an NxHxWx3 batch)."""
    if mode == "whole-frame":
        return pixels
    if mode == "lesion":
        return lesion_crop(pixels) if pixels.ndim == 3 else np.stack([lesion_crop(image) for image in pixels])
    raise ValueError(f"unknown crop mode {mode!r}; choose one of {', '.join(CROP_MODES)}")


def lesion_crop(image: np.ndarray) -> np.ndarray:
    """The square around the lesion, resized back to the image's size; the whole frame when no
    lesion stands out.

    ISIC photos show the lesion small in a wide frame with the scope's round black surround,
    rulers and ink at the edges; another clinic's (derm7pt) are cut tight around it. Cutting
    every image to its lesion gives the network one framing, and fewer corners to learn a
    camera from.
    """
    box = lesion_box(image)
    if box is None:
        return image
    top, left, side = box
    height, width = image.shape[:2]
    picture = Image.fromarray(image).resize((width, height), RESAMPLE, box=(left, top, left + side, top + side))
    return np.asarray(picture, dtype=np.uint8)


def lesion_box(image: np.ndarray) -> tuple[float, float, float] | None:
    """(top, left, side) of the square around the lesion in an HxWx3 uint8 image, or None.

    Found on a BOX_SIDE thumbnail: the lesion is the skin at least MIN_LESION_CONTRAST darker
    than a blur of the skin around it (so the scope's vignette is not taken for it); the black
    surround and its dim rim (RIM_SHARE of the side) are left out. Its box spans the 5th to
    95th percentile of those pixels' rows and columns (a hair or an ink mark does not stretch
    it), widened by LESION_MARGIN on each side and made square.
    """
    height, width = image.shape[:2]
    small = np.asarray(Image.fromarray(image).resize((BOX_SIDE, BOX_SIDE), Image.Resampling.BOX))
    luminance = (small[..., 0].astype(np.uint16) + small[..., 1] + small[..., 2]) // 3
    surround = luminance <= SURROUND_LUMINANCE
    if surround.mean() > 0.8:
        return None
    skin = ~_near(surround, round(RIM_SHARE * BOX_SIDE))
    # Darker than the skin around it, not merely dark: the scope's vignette darkens the edges too.
    level = luminance.astype(np.uint8)
    level[~skin] = np.median(level[skin]) if skin.any() else 0
    around = np.asarray(Image.fromarray(level).filter(ImageFilter.GaussianBlur(BOX_SIDE / 8)), dtype=np.float32)
    lesion = skin & (level < (1 - MIN_LESION_CONTRAST) * around)
    if lesion.mean() < 0.01:
        return None
    top, bottom = _middle_span(lesion.sum(axis=1))
    left, right = _middle_span(lesion.sum(axis=0))
    scale_y, scale_x = height / BOX_SIDE, width / BOX_SIDE
    top, bottom, left, right = top * scale_y, bottom * scale_y, left * scale_x, right * scale_x
    side = max(bottom - top, right - left) * (1 + 2 * LESION_MARGIN)
    side = float(np.clip(side, MIN_CROP_SHARE * min(height, width), min(height, width)))
    top = float(np.clip((top + bottom - side) / 2, 0, height - side))
    left = float(np.clip((left + right - side) / 2, 0, width - side))
    return top, left, side


def _near(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (a square) of a True pixel of ``mask``; outside the frame counts as False."""
    return _near_rows(_near_rows(mask, radius).T, radius).T


def _near_rows(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` rows of a True pixel in their column."""
    counts = np.cumsum(np.pad(mask, ((radius + 1, radius), (0, 0))), axis=0, dtype=np.int32)
    return counts[2 * radius + 1:] - counts[: -2 * radius - 1] > 0


def _middle_span(counts: np.ndarray) -> tuple[float, float]:
    """The 5th and 95th percentile positions of a profile of pixel counts."""
    cumulative = np.cumsum(counts)
    first, last = np.searchsorted(cumulative, [0.05 * cumulative[-1], 0.95 * cumulative[-1]])
    return float(first), float(last + 1)


def normalize_colour(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Apply a card's colour mode to uint8 pixels (one HxWx3 image or an NxHxWx3 batch)."""
    if mode == "as-is":
        return pixels
    if mode == "shades-of-grey":
        return shades_of_grey(pixels)
    if mode == "luminance":
        return luminance(pixels)
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


#: ITU-R BT.601 luma weights of R, G and B (what Pillow's convert("L") uses).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def luminance(pixels: np.ndarray) -> np.ndarray:
    """Each pixel's luma in all three channels: shape and texture only, no colour at all.

    Colour statistics rank melanoma against nevus in opposite directions at different
    cameras (saturation: AUC 0.24 on HAM10000, 0.71 on derm7pt), so a network that leans on
    them fails at the next clinic. Three equal channels keep the model's input shape.
    """
    luma = np.clip(np.rint(pixels.astype(np.float32) @ LUMA_WEIGHTS), 0, 255).astype(np.uint8)
    return np.repeat(luma[..., np.newaxis], 3, axis=-1)
