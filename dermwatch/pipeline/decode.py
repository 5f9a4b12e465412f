"""Read an image file into a validated RGB picture, or say why it cannot be used.

Used by the service and by training, so both see exactly the same pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermwatch.errors import RejectedImage
from dermwatch.preprocess import to_model_input

#: Formats a dermatoscope or a clinic's camera produces (MPO is a multi-picture JPEG; PH2's
#: dermatoscope wrote BMP, and archives keep lossless TIFF: of a TIFF the first page is read).
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF"})
#: Smallest side that still shows a lesion; anything smaller is an icon or a mistake.
MIN_SIDE = 32

# The pixel limit is dermwatch's own ([images] max_pixels), checked from the header before
# anything is decoded; Pillow's global guard would otherwise fire first with its own numbers.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB picture and the facts about the file it came from."""

    image: Image.Image
    format: str
    width: int  # of the original frame, after EXIF orientation
    height: int


def read_rgb(source: Path | bytes, *, max_pixels: int, draft_size: int | None = None) -> DecodedImage:
    """Decode a file, or its bytes already in memory, to an upright RGB image.

    ``draft_size`` lets the JPEG decoder scale down by a power of two while keeping both
    sides at least that large: several times faster for full-size photos, and harmless
    because the model input is smaller still.
    Raises :class:`RejectedImage` with a reason a person can read.
    """
    try:
        with Image.open(_open(source)) as probe:
            fmt = probe.format or "unknown"
            _check_header(fmt, probe.size, max_pixels)
            probe.verify()
        with Image.open(_open(source)) as image:
            width, height = image.size
            transposed = _orientation_swaps_sides(image)
            if draft_size and fmt in {"JPEG", "MPO"}:
                image.draft(image.mode, (draft_size, draft_size))
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except RejectedImage:
        raise
    except UnidentifiedImageError:
        raise RejectedImage(_unreadable(source)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise RejectedImage(f"damaged or truncated image: {error}") from None
    if transposed:
        width, height = height, width
    return DecodedImage(image=rgb, format=fmt, width=width, height=height)


def read_model_input(source: Path | bytes, size: int, *, max_pixels: int) -> tuple[DecodedImage, np.ndarray]:
    """The decoded file and exactly the pixels the model sees: the one path from file to
    model input, shared by the service, `classify`, training, evaluation and the heatmaps."""
    decoded = read_rgb(source, max_pixels=max_pixels, draft_size=size)
    return decoded, to_model_input(decoded.image, size)


def _open(source: Path | bytes) -> Path | BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


#: ISO media brands of HEIF still images (HEIC is an iPhone camera's default format).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif"})


def _unreadable(source: Path | bytes) -> str:
    """Why Pillow could not read the file, with the way out where the kind is known."""
    start = source[:12] if isinstance(source, bytes) else _first_bytes(source, 12)
    if start[4:8] == b"ftyp" and start[8:12] in _HEIF_BRANDS:
        return ("HEIC/HEIF photo (an iPhone camera's default), which dermwatch does not read: save it as JPEG "
                "(on the iPhone: Settings > Camera > Formats > Most Compatible)")
    return "not an image file Pillow can read"


def _first_bytes(path: Path, count: int) -> bytes:
    try:
        with path.open("rb") as handle:  # Pillow has just opened it: a regular file
            return handle.read(count)
    except OSError:
        return b""


def _check_header(fmt: str, size: tuple[int, int], max_pixels: int) -> None:
    if fmt not in ACCEPTED_FORMATS:
        raise RejectedImage(f"unsupported image format {fmt} (dermwatch reads JPEG, PNG, BMP and TIFF)")
    width, height = size
    if width * height > max_pixels:
        raise RejectedImage(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if min(width, height) < MIN_SIDE:
        raise RejectedImage(f"image is {width}x{height}, smaller than {MIN_SIDE} pixels on a side")


def _orientation_swaps_sides(image: Image.Image) -> bool:
    # EXIF orientations 5-8 rotate by 90 or 270 degrees.
    return image.getexif().get(0x0112, 1) in {5, 6, 7, 8}


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode Pillow reads to 8-bit RGB without clipping or leaving alpha."""
    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        # 16-bit greyscale: scale to 8 bits; convert() would clip everything above 255.
        wide = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise RejectedImage("floating-point images are not photographs dermwatch can read")
    if image.mode in {"RGBA", "LA", "PA"} or "transparency" in image.info:
        # Transparent regions become black, like the vignette of a dermatoscope.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
