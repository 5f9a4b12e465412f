"""The TensorFlow input pipeline (tf.data): the default on the CPU, and what the shipped
model's members were trained with, so its random stream is kept as it is."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dermwatch.training.data import COLOUR_JITTERS, geometric_augmentation, refuse_weights_with_draws
from dermwatch.training.options import TrainOptions


def training_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                     augment: bool = True, sample_weights: np.ndarray | None = None,
                     draws: np.ndarray | None = None,
                     colour_jitter: str = TrainOptions.colour_jitter,
                     zoom: str = TrainOptions.zoom) -> tf.data.Dataset:
    """Batches with on-the-fly augmentation; nothing augmented is ever stored.

    The images come shuffled once per epoch, or, with ``draws`` (from :func:`epoch_draws`),
    in that order. With ``sample_weights`` each batch is (images, labels, weights), which
    Keras applies to the loss.
    """
    refuse_weights_with_draws(draws, sample_weights)
    targets = labels if sample_weights is None else (labels, sample_weights)
    if draws is None:
        dataset = tf.data.Dataset.from_tensor_slices((images, targets)).shuffle(
            len(labels), seed=seed, reshuffle_each_iteration=True
        )
    else:
        pool_images, pool_labels = tf.constant(images), tf.constant(labels)
        dataset = tf.data.Dataset.from_tensor_slices(draws.ravel()).map(
            lambda i: (tf.gather(pool_images, i), tf.gather(pool_labels, i))
        )
    if not augment:
        return _unpack(dataset.map(lambda x, y: (tf.cast(x, tf.float32), y)).batch(batch_size), sample_weights)
    geometric = geometric_augmentation(seed, zoom)

    jitter = COLOUR_JITTERS[colour_jitter]

    def dihedral_and_colour(image, label):
        image = tf.cast(image, tf.float32)
        image = tf.image.rot90(image, tf.random.uniform([], 0, 4, dtype=tf.int32))
        image = tf.image.random_flip_left_right(image)
        image = tf.image.random_brightness(image, jitter.brightness)
        image = tf.image.random_contrast(image, *jitter.contrast)
        image = tf.image.random_saturation(image, *jitter.saturation)
        image = tf.image.random_hue(image, jitter.hue)
        if jitter.channel_gain:  # only where asked: mild's random stream stays as it always was
            image = image * tf.random.uniform([3], 1 - jitter.channel_gain, 1 + jitter.channel_gain)
        return tf.clip_by_value(image, 0.0, 255.0), label

    batches = (
        dataset.map(dihedral_and_colour, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .map(lambda x, y: (geometric(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    )
    return _unpack(batches, sample_weights)


def _unpack(batches: tf.data.Dataset, sample_weights: np.ndarray | None) -> tf.data.Dataset:
    """(x, (y, w)) -> (x, y, w), the form Keras reads sample weights from."""
    if sample_weights is not None:
        batches = batches.map(lambda x, target: (x, target[0], target[1]))
    return batches.prefetch(tf.data.AUTOTUNE)
