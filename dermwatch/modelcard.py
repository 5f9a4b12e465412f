"""The model card: the JSON that travels beside every .tflite and says how to use it.

The service reads it and refuses a model whose card is missing or does not match;
it never guesses labels, input size or the alert threshold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dermwatch.errors import ModelError
from dermwatch.labels import CLASS_NAMES
from dermwatch.preprocess import COLOUR_MODES, CROP_MODES

#: File name of the model shipped inside the package (dermwatch/models/).
SHIPPED_MODEL_NAME = "dermwatch.tflite"


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    labels: tuple[str, ...]
    input_size: int
    colour: str  # one of preprocess.COLOUR_MODES; applied by the classifier before every invoke
    crop: str  # one of preprocess.CROP_MODES; likewise
    melanoma_threshold: float
    sha256: str  # of the .tflite file
    document: dict[str, Any]  # the whole card, for reports and `status`

    @property
    def display(self) -> str:
        return f"{self.name} {self.version} ({self.sha256[:12]})"


def card_path(model_path: Path) -> Path:
    """The card of ``x.tflite`` is ``x.json`` beside it."""
    return model_path.with_suffix(".json")


def shipped_model_path() -> Path:
    return Path(str(resources.files("dermwatch") / "models" / SHIPPED_MODEL_NAME))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(model_path: Path) -> ModelCard:
    """Read and check the card of ``model_path`` against the file and this version's labels."""
    path = card_path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model file {model_path} does not exist")
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model card {path} is missing: every model needs its card beside it") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"model card {path} cannot be read: {error}") from None
    try:
        card = ModelCard(
            name=str(document["name"]),
            version=str(document["version"]),
            labels=tuple(document["labels"]),
            input_size=int(document["input"]["size"]),
            colour=str(document["input"].get("colour", "as-is")),  # cards before colour modes had none
            crop=str(document["input"].get("crop", "whole-frame")),  # nor before crop modes
            melanoma_threshold=float(document["melanoma_threshold"]),
            sha256=str(document["sha256"]),
            document=document,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"model card {path} lacks or mangles field {error}") from None
    if card.labels != CLASS_NAMES:
        raise ModelError(f"model card {path} lists labels {list(card.labels)}, expected {list(CLASS_NAMES)}")
    if card.colour not in COLOUR_MODES:
        raise ModelError(f"model card {path}: input colour {card.colour!r} is not one of {', '.join(COLOUR_MODES)}")
    if card.crop not in CROP_MODES:
        raise ModelError(f"model card {path}: input crop {card.crop!r} is not one of {', '.join(CROP_MODES)}")
    if not 0.0 < card.melanoma_threshold < 1.0:
        raise ModelError(f"model card {path}: melanoma_threshold {card.melanoma_threshold} is not in (0, 1)")
    actual = file_sha256(model_path)
    if actual != card.sha256:
        raise ModelError(
            f"model {model_path} has sha256 {actual[:12]}…, its card says {card.sha256[:12]}…: "
            "the card belongs to another model"
        )
    return card


def write_card(model_path: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` as the card of ``model_path``, stamping the file's sha256."""
    document = {**document, "sha256": file_sha256(model_path), "file": model_path.name}
    path = card_path(model_path)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
