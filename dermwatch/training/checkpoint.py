"""Checkpoints after every epoch, so a stopped training run continues where it stopped.

A checkpoint is the model with its optimizer state (schedule step, moments, EMA), the best
epoch's weights so far, and the per-epoch record. progress.json is written last and names
the model file of its epoch: whatever moment a run is stopped at, the folder holds one
consistent epoch to resume from.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from dermwatch.reports.atomic import write_atomically

PROGRESS_FILE = "progress.json"
BEST_WEIGHTS_FILE = "best-weights.npz"


@dataclass
class Progress:
    """What the run had done when its last checkpoint was written."""

    epochs_done: int
    model_file: str
    history: list[dict] = field(default_factory=list)
    best_score: float = float("-inf")
    best_epoch: int = -1
    seconds: float = 0.0  # training time of the epochs done, over every resumed part


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch (and after KeepBestEpoch has scored it), save the run's state to ``folder``."""

    def __init__(self, folder: Path, keeper) -> None:
        super().__init__()
        self.folder, self.keeper = folder, keeper
        self.saved_best_epoch = keeper.best_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        model_file = f"epoch-{epoch + 1:03d}.keras"
        self.model.save(self.folder / model_file)
        if self.keeper.best_epoch != self.saved_best_epoch:
            weights = io.BytesIO()
            np.savez(weights, *self.keeper.best_weights)
            write_atomically(self.folder / BEST_WEIGHTS_FILE, weights.getvalue())
            self.saved_best_epoch = self.keeper.best_epoch
        progress = Progress(epoch + 1, model_file, self.keeper.history, float(self.keeper.best_score),
                            self.keeper.best_epoch, self.keeper.seconds_before + self.keeper.seconds())
        write_atomically(self.folder / PROGRESS_FILE, json.dumps(asdict(progress)).encode())
        for old in self.folder.glob("epoch-*.keras"):
            if old.name != model_file:
                old.unlink()


def load_progress(folder: Path) -> Progress | None:
    """The last complete checkpoint in ``folder``, or None when the run never finished an epoch."""
    path = folder / PROGRESS_FILE
    if not path.exists():
        return None
    return Progress(**json.loads(path.read_text()))


def load_best_weights(folder: Path) -> list[np.ndarray] | None:
    path = folder / BEST_WEIGHTS_FILE
    if not path.exists():
        return None
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]

