"""The fused batch norm trains exactly as Keras's own: outputs, gradients, moving statistics."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from dermwatch.training.batch_norm import FusedBatchNormalization
from dermwatch.training.model import load_trained_model


def _built_alike(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """Keras's BatchNormalization and the fused one, holding the same random weights."""
    plain, fused = keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)
    channels = shape[-1]
    weights = [rng.normal(1, 0.3, channels), rng.normal(0, 0.5, channels), rng.normal(0, 1, channels),
               rng.uniform(0.5, 2, channels)]  # gamma, beta, moving mean, moving variance
    for layer in (plain, fused):
        layer.build(shape)
        layer.set_weights([w.astype(np.float32) for w in weights])
    return plain, fused


def _step(layer: keras.layers.Layer, x: tf.Tensor, upstream: tf.Tensor) -> list[np.ndarray]:
    """One training call: output, gradients of a weighted sum of it, and the moving statistics after."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        output = layer(x, training=True)
        loss = tf.reduce_sum(output * upstream)
    gradients = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [np.asarray(t) for t in (output, *gradients, layer.moving_mean, layer.moving_variance)]


@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (1, 1, 1, 4)])
def test_the_fused_batch_norm_trains_as_keras_does(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    plain, fused = _built_alike(shape, rng)
    x = tf.constant(rng.normal(2, 3, shape), tf.float32)
    upstream = tf.constant(rng.normal(0, 1, shape), tf.float32)
    names = ("output", "input gradient", "gamma gradient", "beta gradient", "moving mean", "moving variance")
    for name, ours, keras_own in zip(names, _step(fused, x, upstream), _step(plain, x, upstream), strict=True):
        np.testing.assert_allclose(ours, keras_own, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), rtol=1e-5, atol=1e-5)

    traced = tf.function(lambda t: fused(t, training=True)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    assert "FusedBatchNormV3" in {op.type for op in traced.graph.get_operations()}


def test_a_network_with_it_saves_and_loads(tmp_path: Path) -> None:
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, FusedBatchNormalization(name="bn")(inputs))
    model.save(tmp_path / "model.keras")
    loaded = load_trained_model(tmp_path / "model.keras")
    assert type(loaded.get_layer("bn")) is FusedBatchNormalization
