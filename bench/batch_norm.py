"""What the fused batch norm saves per training step: EfficientNet-Lite0 as `dermwatch train`
builds it, against the same network with Keras's own BatchNormalization, in one process.

The two alternate in blocks of steps, so that a machine whose pace drifts (a shared VM's did,
by 15 % between runs of bench/train_speed.py) weighs on both alike; the median block decides.

    python bench/batch_norm.py [--blocks 8] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import dermwatch  # noqa: F401  first: it turns on TensorFlow's oneDNN kernels, before TensorFlow loads

# isort: split

import keras
import numpy as np
import tensorflow as tf

from dermwatch.training.batch_norm import FusedBatchNormalization
from dermwatch.training.model import build_model
from dermwatch.training.options import TrainOptions
from dermwatch.training.train import compile_for_training


def _with_keras_batch_norm(layer: keras.layers.Layer) -> keras.layers.Layer:
    if isinstance(layer, FusedBatchNormalization):
        return keras.layers.BatchNormalization.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per network")
    parser.add_argument("--steps", type=int, default=4, help="training steps per block")
    args = parser.parse_args()
    options = TrainOptions()
    tf.config.experimental.enable_op_determinism()  # as train._seed_everything
    keras.utils.set_random_seed(options.seed)
    fused = build_model(options.arch, options.input_size)
    networks = {"Keras BatchNormalization": keras.models.clone_model(fused, clone_function=_with_keras_batch_norm),
                "FusedBatchNormalization": fused}
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (options.batch_size, options.input_size, options.input_size, 3)).astype(np.float32)
    labels = np.arange(options.batch_size) % 9
    for model in networks.values():
        compile_for_training(model, options, options.epoch_images // options.batch_size)
        for _ in range(2):  # trace, then warm up
            model.train_on_batch(pixels, labels)
    seconds = {name: [] for name in networks}
    for _ in range(args.blocks):
        for name, model in networks.items():
            started = time.monotonic()
            for _ in range(args.steps):
                model.train_on_batch(pixels, labels)
            seconds[name].append((time.monotonic() - started) / args.steps)
    for name, per_step in seconds.items():
        median = statistics.median(per_step)
        print(f"{name:>25}: {median:.2f} s a step of {options.batch_size} "
              f"({options.batch_size / median:.1f} images/s); blocks {', '.join(f'{s:.2f}' for s in per_step)}")


if __name__ == "__main__":
    main()
