"""Train a network on audited data, keep its best validation epoch, and calibrate it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np

from dermwatch.labels import CLASS_NAMES
from dermwatch.preprocess import model_view
from dermwatch.training.audit import Audit, ManifestRow
from dermwatch.training.calibration import THRESHOLD_RULE, calibrate, softmax
from dermwatch.training.checkpoint import EpochCheckpoint, Progress, load_best_weights, load_progress
from dermwatch.training.data import (
    balance_weights,
    class_and_source_weights,
    class_priors,
    class_weights,
    epoch_draws,
    load_arrays,
)
from dermwatch.training.efficientnet_lite import IMAGENET_WEIGHTS
from dermwatch.training.ema import SwapEMAWeights
from dermwatch.training.losses import SmoothedSparseCrossentropy
from dermwatch.training.metrics import MELANOMA_INDEX, balanced_accuracy, roc_auc, summarize
from dermwatch.training.model import build_model, load_trained_model
from dermwatch.training.options import TrainOptions
from dermwatch.training.portable_batches import PortableBatches

log = logging.getLogger(__name__)

#: Where a run keeps its per-epoch checkpoints (checkpoint.py).
CHECKPOINT_FOLDER = "checkpoint"


def data_fingerprint(rows: list[ManifestRow]) -> str:
    """sha256 over what training and validation used: content, label and split of each file."""
    lines = sorted(f"{r.sha256},{r.resolved_label},{r.split}" for r in rows if r.split in {"train", "val"})
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class KeepBestEpoch(keras.callbacks.Callback):
    """Score validation after every epoch; keep the weights of the best one.

    The score is balanced accuracy plus melanoma ROC AUC: the two things a clinic needs.
    A resumed run hands in what the stopped part had scored (checkpoint.Progress).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, logit_offset: np.ndarray | None = None,
                 progress: Progress | None = None, best_weights: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.images, self.labels = images, labels
        self.logit_offset = np.zeros(len(CLASS_NAMES), np.float32) if logit_offset is None else logit_offset
        self.history: list[dict] = list(progress.history) if progress else []
        self.best_score = progress.best_score if progress else -np.inf
        self.best_epoch = progress.best_epoch if progress else -1
        self.best_weights = best_weights
        self.seconds_before = progress.seconds if progress else 0.0
        self.epochs_before = progress.epochs_done if progress else 0
        self.started = time.monotonic()

    def seconds(self) -> float:
        """Training time so far in this part of the run."""
        return time.monotonic() - self.started

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logits = self.model.predict(self.images, batch_size=64, verbose=0) + self.logit_offset
        predicted = logits.argmax(axis=1)
        record = {
            "epoch": epoch + 1,
            "loss": float((logs or {}).get("loss", np.nan)),
            "accuracy": float((logs or {}).get("accuracy", np.nan)),
            "val_accuracy": float((predicted == self.labels).mean()),
            "val_balanced_accuracy": balanced_accuracy(self.labels, predicted),
            "val_melanoma_auc": roc_auc(self.labels == MELANOMA_INDEX, softmax(logits)[:, MELANOMA_INDEX]),
            "seconds": round(self.seconds_before + self.seconds(), 1),
        }
        self.history.append(record)
        score = record["val_balanced_accuracy"] + record["val_melanoma_auc"]
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch + 1
            self.best_weights = self.model.get_weights()
        log.info(
            "epoch %(epoch)d: loss %(loss).3f acc %(accuracy).3f | val acc %(val_accuracy).3f "
            "bal %(val_balanced_accuracy).3f mel-AUC %(val_melanoma_auc).3f | %(seconds).0fs",
            record,
        )
        epochs = self.params.get("epochs", epoch + 1)
        if epoch + 1 < epochs:  # the pace differs several-fold between CPUs: say early what this one needs
            log.info("%d of %d epochs to go: about %.0f min at this pace", epochs - epoch - 1, epochs,
                     (epochs - epoch - 1) * self.seconds() / (epoch + 1 - self.epochs_before) / 60)


def on_tensorflow() -> bool:
    """Whether Keras runs on TensorFlow (the CPU default) rather than, say, JAX on a GPU."""
    return keras.backend.backend() == "tensorflow"


def _seed_everything(seed: int) -> None:
    """Same seed, same data -> the same model: seeded generators, and on TensorFlow
    deterministic kernels too (imported only there: a JAX machine has no TensorFlow)."""
    keras.utils.set_random_seed(seed)
    if on_tensorflow():
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _batches(images: np.ndarray, labels: np.ndarray, options: TrainOptions,
             sample_weights: np.ndarray | None, draws: np.ndarray | None, workers: int):
    """tf.data on TensorFlow, the CPU default; on any other backend the NumPy pipeline,
    the same augmentation in kind."""
    if on_tensorflow():
        from dermwatch.training.tf_batches import training_batches

        return training_batches(images, labels, options.batch_size, options.seed, augment=options.augment,
                                sample_weights=sample_weights, draws=draws, colour_jitter=options.colour_jitter,
                                zoom=options.zoom)
    return PortableBatches(images, labels, options.batch_size, options.seed, augment=options.augment,
                           sample_weights=sample_weights, draws=draws, colour_jitter=options.colour_jitter,
                           zoom=options.zoom, workers=workers)


def train(audit: Audit, out_dir: Path, options: TrainOptions, *, resume: bool = False,
          batch_workers: int = 1) -> dict:
    """Fit, keep the best epoch, calibrate, choose the melanoma threshold; save to ``out_dir``.

    After every epoch the run's state is saved under ``out_dir/checkpoint``; with ``resume``
    training continues from the last epoch saved there. ``batch_workers`` threads make the
    batches where the NumPy pipeline is used (any backend but TensorFlow).
    """
    _seed_everything(options.seed)
    rows = audit.rows
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val"]
    log.info("loading %d training and %d validation images", len(train_rows), len(val_rows))
    x_train, y_train = load_arrays(train_rows, options.input_size)
    x_val, y_val = load_arrays(val_rows, options.input_size)
    # Before augmentation, as the classifier does before inference: the model learns on
    # cropped, colour-normalised images, and augmentation still varies them.
    x_train = model_view(x_train, options.colour, options.crop)
    x_val = model_view(x_val, options.colour, options.crop)

    drawn = options.epoch_images > 0
    steps_per_epoch = max(options.epoch_images // options.batch_size, 1) if drawn \
        else int(np.ceil(len(x_train) / options.batch_size))
    checkpoints = out_dir / CHECKPOINT_FOLDER
    progress = load_progress(checkpoints) if resume else None
    if resume and progress is None:
        log.info("no finished epoch in %s: starting from the first", checkpoints)
    if progress:
        model = load_trained_model(checkpoints / progress.model_file)
        log.info("resuming after epoch %d of %d", progress.epochs_done, options.epochs)
    else:
        model = build_model(options.arch, options.input_size, width=options.width)
        compile_for_training(model, options, steps_per_epoch)
    first_epoch = progress.epochs_done if progress else 0
    logit_offset = -np.log(class_priors(y_train)) if options.balance == "logit-adjust" else None
    keeper = KeepBestEpoch(x_val.astype(np.float32), y_val, logit_offset, progress,
                           load_best_weights(checkpoints) if progress else None)
    callbacks = [keeper, EpochCheckpoint(checkpoints, keeper)]
    if _uses_ema(options):
        # The averaged weights are swapped in before the keeper scores each epoch. A checkpoint
        # is written with them in the model, so a resumed run starts swapped.
        callbacks.insert(0, SwapEMAWeights(average_in_model=progress is not None))
    roots = [r.root for r in train_rows]
    draws = epoch_draws(balance_weights(y_train, roots, options.balance), options.epochs,
                        steps_per_epoch * options.batch_size, options.seed) if drawn else None
    sample_weights = class_and_source_weights(y_train, roots) \
        if options.balance == "class-and-source" and not drawn else None
    if first_epoch < options.epochs:
        build_training_state(model, x_train[:1], y_train[:1])
        model.fit(
            _batches(x_train, y_train, options, sample_weights, None if draws is None else draws[first_epoch:],
                     batch_workers),
            initial_epoch=first_epoch,
            epochs=options.epochs,
            steps_per_epoch=steps_per_epoch if drawn else None,
            class_weight=class_weights(y_train) if options.balance == "weights" and not drawn else None,
            callbacks=callbacks,
            verbose=0,
        )
    wall_seconds = keeper.seconds_before + keeper.seconds()
    model = _without_optimizer(model)
    if options.keep_best:
        model.set_weights(keeper.best_weights)
    kept_epoch = keeper.best_epoch if options.keep_best else options.epochs
    if logit_offset is not None:
        add_to_logit_bias(model, logit_offset)

    val_logits = model.predict(x_val.astype(np.float32), batch_size=64, verbose=0)
    temperature, threshold, val_probabilities = calibrate(val_logits, y_val)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "model.keras")
    record = {
        "options": asdict(options),
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "data_fingerprint": data_fingerprint(rows),
        "train_images": len(train_rows),
        "val_images": len(val_rows),
        "best_epoch": kept_epoch,
        "wall_seconds": round(wall_seconds, 1),
        "resumed_after_epoch": first_epoch or None,
        "temperature": temperature,
        "melanoma_threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "validation": summarize(val_probabilities, y_val, threshold),
        "history": keeper.history,
    }
    if options.arch == "efficientnet-lite0":
        record["initial_weights"] = asdict(IMAGENET_WEIGHTS)
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    log.info(
        "kept epoch %d of %d; temperature %.2f; melanoma threshold %.3f; %.0f s",
        kept_epoch, options.epochs, temperature, threshold, wall_seconds,
    )
    return record


def _without_optimizer(model: keras.Model) -> keras.Model:
    """The same network and weights, uncompiled: the run's model.keras need not carry the
    optimizer's moments (three times the weights), which only a checkpoint needs."""
    bare = type(model).from_config(model.get_config())  # clone_model would copy the compiled optimizer
    bare.set_weights(model.get_weights())
    return bare


def add_to_logit_bias(model: keras.Model, offset: np.ndarray) -> None:
    """Fold a constant logit offset into the last layer, so every later step sees one model."""
    layer = model.get_layer("logits")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, bias + offset.astype(bias.dtype)])


def compile_for_training(model: keras.Model, options: TrainOptions, steps_per_epoch: int) -> None:
    """The optimizer, schedule and loss of ``options``: what `dermwatch train` and
    bench/train_speed.py both fit with."""
    model.compile(optimizer=_optimizer(options, steps_per_epoch), loss=_loss(options), metrics=["accuracy"])


def build_training_state(model: keras.Model, image: np.ndarray, label: np.ndarray) -> None:
    """Create the optimizer's, the loss's and the metrics' variables now, from one image.

    On TensorFlow, Keras otherwise creates them inside the first traced training step, and
    TensorFlow then traces that step twice. Measured on a 2-core AVX2 CPU, the default
    EfficientNet-Lite0 took 55 s to the end of its first two steps, and 39 s with this; a test's
    tiny dermnet run 49 s in all, and 30 s with it. The calls are eager and at inference: no
    weight changes and no random number is drawn, so a run's weights come out bit for bit the same.
    """
    image = image.astype(np.float32)
    predicted = model(image, training=False)
    model.compute_loss(x=image, y=label, y_pred=predicted)
    model.compute_metrics(image, label, predicted, sample_weight=None)
    model.reset_metrics()
    model.optimizer.build(model.trainable_variables)  # does nothing where a checkpoint built it


def _optimizer(options: TrainOptions, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    if options.schedule == "constant":
        return keras.optimizers.Adam(options.learning_rate)
    steps = options.epochs * steps_per_epoch
    warmup = min(max(int(options.warmup_epochs * steps_per_epoch), 1), steps - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, warmup_target=options.learning_rate, warmup_steps=warmup
    )
    return keras.optimizers.AdamW(schedule, weight_decay=options.weight_decay, use_ema=_uses_ema(options),
                                  ema_momentum=options.ema_momentum)


def _loss(options: TrainOptions) -> keras.losses.Loss:
    if options.label_smoothing:
        return SmoothedSparseCrossentropy(options.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _uses_ema(options: TrainOptions) -> bool:
    return options.ema and options.schedule == "cosine"
