"""Run a TFLite model through ai-edge-litert: uint8 RGB batches in, probabilities out."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from dermwatch.errors import ModelError
from dermwatch.labels import CLASS_NAMES
from dermwatch.modelcard import ModelCard, load_card, shipped_model_path
from dermwatch.preprocess import model_view

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """What classifies for a caller that needs no interpreter of its own: a Classifier, or the
    lanes lending theirs (pipeline/lanes.py)."""

    card: ModelCard

    @property
    def input_size(self) -> int: ...

    def predict(self, pixels: np.ndarray) -> np.ndarray: ...


class Classifier:
    """One LiteRT interpreter, fed one image per invoke. Input dtype and quantisation are read
    from the model itself.

    The interpreter keeps a one-image input shape for life: its activations grow with the
    batch (a 65-image heatmap batch took the service from 106 to 406 MiB with the two-seed
    EfficientNet-Lite0), and XNNPACK is no faster per image on batches (7.3 ms at 1, 7.5 at 16).
    The model's bytes are read once and shared by every :meth:`twin`, so the service's
    interpreters hold one copy of the weights' file, not one mapping each.
    """

    def __init__(self, model_path: Path, card: ModelCard, threads: int, content: bytes | None = None) -> None:
        self.card = card
        self.path = model_path
        self.threads = threads
        if content is None:
            content = model_path.read_bytes()
            if hashlib.sha256(content).hexdigest() != card.sha256:
                raise ModelError(f"{model_path} changed after its card was checked: load it again")
        self.content = content
        try:
            self._interpreter = Interpreter(model_content=self.content, num_threads=threads)
        except (ValueError, RuntimeError) as error:
            raise ModelError(f"LiteRT cannot load {model_path}: {error}") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        shape = tuple(self._input["shape"])
        if shape[1:] != (card.input_size, card.input_size, 3):
            raise ModelError(f"{model_path} takes input {shape}, its card says {card.input_size}x{card.input_size}x3")
        if shape[0] != 1:
            self._interpreter.resize_tensor_input(self._input["index"], [1, *shape[1:]])
        if self._output["shape"][-1] != len(CLASS_NAMES):
            raise ModelError(f"{model_path} has {self._output['shape'][-1]} outputs, expected {len(CLASS_NAMES)}")
        self._interpreter.allocate_tensors()

    @property
    def input_size(self) -> int:
        return self.card.input_size

    def twin(self) -> Classifier:
        """Another interpreter on the same model bytes, for another thread."""
        return Classifier(self.path, self.card, self.threads, self.content)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (N x 9, float32) for a uint8 batch of N x size x size x 3 images.

        The card's crop and colour modes are applied here, so the service, `classify`,
        evaluation and the heatmaps all feed the model what it was trained on.
        """
        probabilities = np.empty((len(pixels), len(CLASS_NAMES)), np.float32)
        for index in range(len(pixels)):  # image by image: a float copy of a whole batch is 12 MiB at 65
            image = model_view(pixels[index : index + 1], self.card.colour, self.card.crop)
            self._interpreter.set_tensor(self._input["index"], _quantize(image, self._input))
            self._interpreter.invoke()
            probabilities[index] = _dequantize(self._interpreter.get_tensor(self._output["index"]), self._output)[0]
        return probabilities


def _quantize(pixels: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if dtype == np.float32:
        return pixels.astype(np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    if scale == 1.0:
        # The usual int8 export (pixels - 128): integer arithmetic, exact, and about 50 times
        # faster than going through floats.
        return np.clip(pixels.astype(np.int16) + int(zero_point), info.min, info.max).astype(dtype)
    return np.clip(np.round(pixels / np.float32(scale) + zero_point), info.min, info.max).astype(dtype)


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    if values.dtype == np.float32:
        return values
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def load_classifier(model_path: Path | None, threads: int) -> Classifier:
    """The configured model, or the one shipped in the package; fail loudly if there is none."""
    path = model_path or shipped_model_path()
    if model_path is None and not path.is_file():
        raise ModelError(
            "no model is shipped in this installation yet and [model] path is empty: "
            "train and export one (README, 'Training your own model') and set [model] path"
        )
    card = load_card(path)
    log.info("model %s from %s", card.display, path)
    return Classifier(path, card, threads)
