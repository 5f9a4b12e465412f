"""Batch normalisation that trains through TensorFlow's fused kernel.

Keras 3 normalises a training batch on TensorFlow with separate ops (moments, then
arithmetic), and their gradients are more separate ops again. On a 2-core CPU that made batch
norm cost more than all of EfficientNet-Lite0's convolutions together (a one-off trace with
TensorFlow's profiler: 16.5 of 33 compute seconds over five steps of 64 images at 128 px).
TensorFlow's fused kernel (FusedBatchNormV3 and its gradient) computes the same function in
one pass: bench/batch_norm.py timed a default step at 3.32 s before, 2.84 s after; and with
TensorFlow's oneDNN kernels on (as dermwatch/__init__.py sets), 2.41 s before, 1.79 s after.

The layer is Keras's BatchNormalization in every other respect: the same weights, the same
moving-average update (with the batch's biased variance, as Keras keeps it), and Keras's own
code wherever the fused kernel does not apply (inference, a frozen layer, another backend, a
mask, or inputs that are not NHWC images), so the exported TFLite graph is unchanged.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="dermwatch")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training pass runs TensorFlow's fused kernel."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and self._fusable(inputs, mask)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        normalised, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
        # The kernel returns the variance scaled by n / max(n - 1, 1); Keras keeps the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), unbiased_variance.dtype)
        variance = unbiased_variance * tf.maximum(count - 1.0, 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return normalised

    def _fusable(self, inputs, mask) -> bool:
        """The fused kernel's case: TensorFlow, float32 NHWC images normalised per channel, with
        scale and offset, no mask and no renormalisation."""
        return (keras.backend.backend() == "tensorflow" and mask is None and len(inputs.shape) == 4
                and self.axis in (-1, 3) and self.scale and self.center and not self.renorm
                and not self.synchronized and keras.backend.standardize_dtype(inputs.dtype) == "float32")
