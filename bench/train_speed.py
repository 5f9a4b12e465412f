"""How long the default `dermwatch train` takes on this machine, measured in minutes, not hours.

The pace of training differs several-fold between CPUs, so a README figure from one machine
cannot promise another's. This measures, with the default recipe (TrainOptions) on random
pixels, which cost what real ones do:
  1. training steps alone, one batch fed again and again: the network's share;
  2. the augmentation pipeline alone (training_batches): the input's share;
  3. both, as `dermwatch train` runs them;
and prints what 3. means for the default run's epochs, beside a validation pass, and the
seconds from the start of 1. to the end of its first step (the step's state built, then traced).

    python bench/train_speed.py [--steps 40]
"""

from __future__ import annotations

import argparse
import time

import dermwatch  # noqa: F401  first: it turns on TensorFlow's oneDNN kernels, before TensorFlow loads

# isort: split

import keras
import numpy as np
import tensorflow as tf

from dermwatch.training.data import epoch_draws
from dermwatch.training.ema import SwapEMAWeights
from dermwatch.training.model import build_model
from dermwatch.training.options import TrainOptions
from dermwatch.training.tf_batches import training_batches
from dermwatch.training.train import build_training_state, compile_for_training

#: The shipped run's training and validation images (its card's training.train/val_images).
TRAIN_IMAGES, VAL_IMAGES = 9316, 2328
#: Steps left untimed first: tracing and the first batches' warm-up.
WARM_UP_STEPS = 10


class _StepClock(keras.callbacks.Callback):
    """Seconds to the end of the first step (building and tracing it), and from the end of
    the warm-up steps to the end of the last."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.began = time.monotonic()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if batch == 0:
            self.first_step = time.monotonic() - self.began
        if batch + 1 == WARM_UP_STEPS:
            self.started = time.monotonic()
        self.ended = time.monotonic()


def _fit_rate(options: TrainOptions, batches: tf.data.Dataset, steps: int,
              first: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Training images per second over ``steps`` timed steps, as `dermwatch train` compiles
    and fits, and the seconds from the start (the state built first, as train does) to the
    end of the first step. ``first`` is one image and its label, to build the state from."""
    keras.utils.set_random_seed(options.seed)
    model = build_model(options.arch, options.input_size, width=options.width)
    compile_for_training(model, options, options.epoch_images // options.batch_size)
    started = time.monotonic()
    build_training_state(model, *first)
    built = time.monotonic() - started
    clock = _StepClock()
    model.fit(batches, steps_per_epoch=WARM_UP_STEPS + steps, epochs=1, verbose=0,
              callbacks=[SwapEMAWeights(), clock] if options.ema else [clock])
    return steps * options.batch_size / (clock.ended - clock.started), built + clock.first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    args = parser.parse_args()
    options = TrainOptions()
    tf.config.experimental.enable_op_determinism()  # as train._seed_everything
    pixels = np.random.default_rng(0).integers(0, 256, (TRAIN_IMAGES, options.input_size, options.input_size, 3),
                                               dtype=np.uint8)
    labels = np.arange(TRAIN_IMAGES) % 9
    draws = epoch_draws(np.ones(TRAIN_IMAGES), 1, (WARM_UP_STEPS + args.steps) * options.batch_size, options.seed)

    def augmented() -> tf.data.Dataset:
        return training_batches(pixels, labels, options.batch_size, options.seed, draws=draws,
                                colour_jitter=options.colour_jitter, zoom=options.zoom)

    one_batch = tf.data.Dataset.from_tensors((tf.constant(pixels[:options.batch_size], tf.float32),
                                              tf.constant(labels[:options.batch_size]))).repeat()
    first = (pixels[:1], labels[:1])
    steps_only, first_step = _fit_rate(options, one_batch, args.steps, first)

    batches = iter(augmented())
    for _ in range(WARM_UP_STEPS):
        next(batches)
    started = time.monotonic()
    for _ in range(args.steps):
        next(batches)
    augmentation_only = args.steps * options.batch_size / (time.monotonic() - started)

    both, _ = _fit_rate(options, augmented(), args.steps, first)

    model = build_model(options.arch, options.input_size, width=options.width)
    validation = pixels[:VAL_IMAGES].astype(np.float32)
    model.predict(validation[:options.batch_size], verbose=0)
    started = time.monotonic()
    model.predict(validation, batch_size=64, verbose=0)
    validation_seconds = time.monotonic() - started

    epoch_seconds = options.epoch_images / both + validation_seconds
    print(f"start to first step:     {first_step:6.1f} s (building and tracing it)")
    print(f"training steps alone:    {steps_only:6.1f} images/s")
    print(f"augmentation alone:      {augmentation_only:6.1f} images/s")
    print(f"both, as train runs:     {both:6.1f} images/s")
    print(f"validation pass:         {validation_seconds:6.1f} s for {VAL_IMAGES} images")
    print(f"default run ({options.epochs} epochs of {options.epoch_images} images): about "
          f"{epoch_seconds:.0f} s an epoch, {options.epochs * epoch_seconds / 60:.0f} min in all, with nothing "
          "else running")


if __name__ == "__main__":
    main()
