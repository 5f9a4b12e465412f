"""Classify files that are not arrivals (`classify`, `calibrate`): same decoding and model as
the service, nothing stored or moved."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermwatch.errors import RejectedImage
from dermwatch.pipeline.classifier import Classifier
from dermwatch.pipeline.decode import read_model_input


@dataclass(frozen=True)
class Scored:
    path: Path
    probabilities: np.ndarray | None  # None when the file could not be read
    reason: str = ""  # why not


def score_files(classifier: Classifier, paths: Sequence[Path], *, max_pixels: int,
                batch_size: int = 32) -> Iterator[Scored]:
    """Each path's nine probabilities, or the reason it could not be read, in order."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixels, readable, results = [], [], []
        for path in chunk:
            try:
                pixels.append(read_model_input(path, classifier.input_size, max_pixels=max_pixels)[1])
                readable.append(len(results))
                results.append(Scored(path, None))
            except RejectedImage as rejection:
                results.append(Scored(path, None, str(rejection)))
        if pixels:
            for index, probabilities in zip(readable, classifier.predict(np.stack(pixels)), strict=True):
                results[index] = Scored(results[index].path, probabilities)
        yield from results
