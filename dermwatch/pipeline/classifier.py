"""Run a TFLite model through ai-edge-litert: uint8 RGB batches in, probabilities out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from dermwatch.errors import ModelError
from dermwatch.labels import CLASS_NAMES
from dermwatch.modelcard import ModelCard, load_card, shipped_model_path
from dermwatch.preprocess import model_view

log = logging.getLogger(__name__)


class Classifier:
    """One LiteRT interpreter. Input dtype and quantisation are read from the model itself."""

    def __init__(self, model_path: Path, card: ModelCard, threads: int) -> None:
        self.card = card
        self.path = model_path
        try:
            self._interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
        except (ValueError, RuntimeError) as error:
            raise ModelError(f"LiteRT cannot load {model_path}: {error}") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        shape = tuple(self._input["shape"])
        if shape[1:] != (card.input_size, card.input_size, 3):
            raise ModelError(f"{model_path} takes input {shape}, its card says {card.input_size}x{card.input_size}x3")
        if self._output["shape"][-1] != len(CLASS_NAMES):
            raise ModelError(f"{model_path} has {self._output['shape'][-1]} outputs, expected {len(CLASS_NAMES)}")
        self._batch = 0

    @property
    def input_size(self) -> int:
        return self.card.input_size

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (N x 9, float32) for a uint8 batch of N x size x size x 3 images.

        The card's crop and colour modes are applied here, so the service, `classify`,
        evaluation and the heatmaps all feed the model what it was trained on.
        """
        pixels = model_view(pixels, self.card.colour, self.card.crop)
        if len(pixels) != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], [len(pixels), *pixels.shape[1:]])
            self._interpreter.allocate_tensors()
            self._batch = len(pixels)
        self._interpreter.set_tensor(self._input["index"], _quantize(pixels, self._input))
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._output["index"])
        return _dequantize(raw, self._output)


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
