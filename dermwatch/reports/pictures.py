"""Thumbnails and occlusion heatmaps for the report, cached on disk by content hash.

The heatmap shows where the network looked: each cell of a grid is covered in turn with
the image's mean colour, and the drop in P(melanoma) is how much that region mattered.
It needs only forward passes of the TFLite model, no gradients.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

from dermwatch.labels import CLASS_NAMES, MELANOMA
from dermwatch.pipeline.classifier import Predictor
from dermwatch.pipeline.decode import read_model_input, read_rgb
from dermwatch.preprocess import SURROUND_LUMINANCE
from dermwatch.reports.atomic import write_atomically
from dermwatch.reports.budget import CpuBudget

THUMBNAIL_SIDE = 256  # suspected melanoma: big enough to judge
LIST_THUMBNAIL_SIDE = 96  # every other image: enough to recognise it, and keeps the page small
OCCLUSION_GRID = 8
_MELANOMA = CLASS_NAMES.index(MELANOMA)


class RenderInterrupted(Exception):
    """The service is stopping: a report half made is dropped, never written."""


class Pictures:
    """Makes and caches the inline pictures of a report."""

    def __init__(self, cache_dir: Path, classifier: Predictor | None, max_pixels: int,
                 stopping: threading.Event | None = None, budget: CpuBudget | None = None) -> None:
        self.cache_dir = cache_dir
        self.classifier = classifier
        self.max_pixels = max_pixels
        self.stopping = stopping  # heatmaps of a large day take a while: a stop must not wait for them
        self.budget = budget  # in the service: the share of a core pictures may take from intake

    def _spend(self) -> AbstractContextManager[None]:
        return self.budget.spend() if self.budget is not None else nullcontext()

    def _check_stopping(self) -> None:
        if self.stopping is not None and self.stopping.is_set():
            raise RenderInterrupted

    def thumbnail(self, archive_path: str, sha256: str, side: int = THUMBNAIL_SIDE) -> str | None:
        """A data: URI of a JPEG at most ``side`` px on a side, without any metadata; None if the file is gone."""
        def draw(source: Path) -> Image.Image:
            image = read_rgb(source, max_pixels=self.max_pixels, draft_size=side).image
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
            return image

        return self._cached(self.cache_dir / f"thumbnails-{side}" / f"{sha256}.jpg", archive_path, draw)

    def heatmap(self, archive_path: str, sha256: str, model_sha256: str) -> str | None:
        """The thumbnail with the occlusion map over it, if the model that made the prediction is loaded."""
        classifier = self.classifier
        if classifier is None or classifier.card.sha256 != model_sha256:
            return None

        def draw(source: Path) -> Image.Image:
            # The heatmap starts from the very pixels the service classified.
            _, pixels = read_model_input(source, classifier.input_size, max_pixels=self.max_pixels)
            heat = occlusion_map(classifier, pixels)
            picture = read_rgb(source, max_pixels=self.max_pixels, draft_size=THUMBNAIL_SIDE).image
            picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
            return overlay(picture, heat)

        return self._cached(self.cache_dir / "occlusion" / model_sha256[:16] / f"{sha256}.jpg", archive_path, draw)

    def _cached(self, cached: Path, archive_path: str, draw: Callable[[Path], Image.Image]) -> str | None:
        """``cached`` as a data: URI, drawn from the archived file first if it is not there yet;
        None if the archived file is gone."""
        if not cached.exists():
            self._check_stopping()
            source = Path(archive_path)
            if not source.is_file():
                return None
            with self._spend():
                write_atomically(cached, _jpeg(draw(source)))
        return _data_uri(cached.read_bytes())


def occlusion_map(classifier: Predictor, pixels: np.ndarray, grid: int = OCCLUSION_GRID) -> np.ndarray:
    """grid x grid drops in P(melanoma) when each cell is hidden.

    0 where hiding the cell did not lower it, and on the dark border (see :func:`dark_cells`).
    Cells are of the frame the service decoded; with a card that crops to the lesion, the
    classifier cuts each occluded copy anew, so hiding the lesion also moves the crop: the map
    then says what mattered to the model's whole pipeline.
    """
    size = pixels.shape[0]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    fill = pixels.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    batch = np.repeat(pixels[None], grid * grid + 1, axis=0)
    for index in range(grid * grid):
        row, column = divmod(index, grid)
        batch[index + 1, edges[row]:edges[row + 1], edges[column]:edges[column + 1]] = fill
    scores = classifier.predict(batch)[:, _MELANOMA]
    heat = np.clip(scores[0] - scores[1:], 0, None).reshape(grid, grid)
    heat[dark_cells(pixels, edges)] = 0.0
    return heat


def dark_cells(pixels: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Which grid cells are nearly black: the dermatoscope border and vignetted corners."""
    luminance = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    grid = len(edges) - 1
    means = np.array([[luminance[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].mean() for c in range(grid)]
                      for r in range(grid)])
    return means < SURROUND_LUMINANCE


def overlay(picture: Image.Image, heat: np.ndarray) -> Image.Image:
    """Red where hiding the region lowered P(melanoma) most, fading to nothing where it did not."""
    peak = heat.max()
    strength = heat / peak if peak > 0 else heat
    mask = Image.fromarray((strength * 255).astype(np.uint8)).resize(picture.size, Image.Resampling.BILINEAR)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255 * 0.6
    red = np.array([230, 20, 20], dtype=np.float32)
    blended = np.asarray(picture, dtype=np.float32) * (1 - alpha) + red * alpha
    return Image.fromarray(blended.round().astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)  # saved without EXIF, ICC profile or comments
    return buffer.getvalue()


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
