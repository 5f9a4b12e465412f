"""Training batches on any Keras backend: JAX on a GPU machine, which has no TensorFlow.

NumPy draws the order, the quarter turns, the flips and the colours; Keras layers do the
small rotations, zooms and shifts (data.geometric_augmentation). The augmentation is the
same in kind as tf_batches', not in random stream: a model trained here is not bit-for-bit
the one the TensorFlow pipeline gives with the same seed.
"""

from __future__ import annotations

import keras
import numpy as np

from dermwatch.training.data import (
    COLOUR_JITTERS,
    ColourJitter,
    geometric_augmentation,
    refuse_weights_with_draws,
)
from dermwatch.training.options import TrainOptions

#: RGB to YIQ (NTSC): luma and two chroma axes. Saturation scales the chroma, hue turns it.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ).astype(np.float32)


def jitter_colours(images: np.ndarray, jitter: ColourJitter, rng: np.random.Generator) -> np.ndarray:
    """Move each image's brightness, contrast, saturation and hue (and each channel's gain),
    by as much as tf.image's random_* functions do with the same settings; float 0-255."""
    count = len(images)
    images = images + rng.uniform(-jitter.brightness, jitter.brightness, (count, 1, 1, 1)).astype(np.float32)
    means = images.mean(axis=(1, 2), keepdims=True)
    images = (images - means) * rng.uniform(*jitter.contrast, (count, 1, 1, 1)).astype(np.float32) + means
    yiq = images @ RGB_TO_YIQ.T
    angle = rng.uniform(-jitter.hue, jitter.hue, count) * 2 * np.pi  # hue: a fraction of the circle
    saturation = rng.uniform(*jitter.saturation, count)
    cos, sin = np.cos(angle) * saturation, np.sin(angle) * saturation
    turn = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2).astype(np.float32)  # n x 2 x 2
    yiq[..., 1:] = np.einsum("nhwc,ndc->nhwd", yiq[..., 1:], turn)
    images = yiq @ YIQ_TO_RGB.T
    if jitter.channel_gain:
        gain = rng.uniform(1 - jitter.channel_gain, 1 + jitter.channel_gain, (count, 1, 1, 3))
        images = images * gain.astype(np.float32)
    return np.clip(images, 0.0, 255.0)


class PortableBatches(keras.utils.PyDataset):
    """Batches of (images, labels[, weights]) with on-the-fly augmentation, nothing stored.

    Shuffled anew each epoch, or, with ``draws`` (data.epoch_draws, one row per epoch), in
    that order. Each batch's randomness comes from (seed, epoch, batch), so a run repeats.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, *,
                 augment: bool = True, sample_weights: np.ndarray | None = None,
                 draws: np.ndarray | None = None, colour_jitter: str = TrainOptions.colour_jitter,
                 zoom: str = TrainOptions.zoom,
                 workers: int = 1) -> None:
        # Several worker threads make batches at once (the GPU waits on augmentation, not the
        # reverse); the geometric layers' random stream then depends on thread timing.
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4 * workers)
        refuse_weights_with_draws(draws, sample_weights)
        self.images, self.labels, self.sample_weights = images, labels, sample_weights
        self.batch_size, self.seed, self.draws = batch_size, seed, draws
        self.jitter = COLOUR_JITTERS[colour_jitter]
        self.geometric = geometric_augmentation(seed, zoom) if augment else None
        self.epoch = 0
        self.order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if self.draws is not None:
            return self.draws[self.epoch % len(self.draws)]
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.labels))

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = self.images[chosen].astype(np.float32)
        if self.geometric is not None:
            images = self._augment(images, np.random.default_rng((self.seed, self.epoch, index)))
        labels = self.labels[chosen]
        return (images, labels) if self.sample_weights is None else (images, labels, self.sample_weights[chosen])

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._epoch_order()

    def _augment(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        turned = np.stack([np.rot90(image, turns) for image, turns in zip(images, rng.integers(0, 4, len(images)),
                                                                          strict=True)])
        flipped = rng.random(len(images)) < 0.5
        turned[flipped] = turned[flipped, :, ::-1]
        coloured = jitter_colours(turned, self.jitter, rng)
        return keras.ops.convert_to_numpy(self.geometric(coloured, training=True))
