"""The networks: EfficientNet-Lite0 from ImageNet weights, dermwatch's own from-scratch CNN,
and the notebook's seed recipe.

Each takes raw RGB pixel values (0-255, float) and return logits for the nine classes, so
the service never needs to know how pixels are scaled: the model does it.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from dermwatch.labels import CLASS_NAMES
from dermwatch.training.batch_norm import FusedBatchNormalization
from dermwatch.training.model_names import ARCHITECTURES


def build_model(arch: str, input_size: int, *, width: int = 32, dropout: float = 0.3) -> keras.Model:
    """Return an uncompiled model ``arch`` for ``input_size`` x ``input_size`` RGB input.

    ``width`` and ``dropout`` shape dermnet; EfficientNet-Lite0 is built as published."""
    if arch == "efficientnet-lite0":
        from dermwatch.training.efficientnet_lite import build_efficientnet_lite0

        return build_efficientnet_lite0(input_size, len(CLASS_NAMES))
    if arch == "seed":
        return _seed(input_size)
    if arch == "dermnet":
        return _dermnet(input_size, width, dropout)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def load_trained_model(path: Path) -> keras.Model:
    """A saved network (model.keras or a checkpoint), with dermwatch's own layers known to Keras."""
    return keras.models.load_model(path)


def _seed(input_size: int) -> keras.Model:
    """The notebook's Model 3: three conv/pool stages, Flatten, Dense 128."""
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    logits = layers.Dense(len(CLASS_NAMES), name="logits")(x)
    return keras.Model(inputs, logits, name="seed")


def _dermnet(input_size: int, width: int, dropout: float) -> keras.Model:
    """A small residual CNN: a strided stem, then four stages of two residual blocks.

    Depthwise-separable convolutions keep it fast on two CPU cores; batch norm and global
    average pooling keep it trainable from scratch on a few thousand images.
    """
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = _conv_bn(x, width, 3, strides=2)
    x = _conv_bn(x, width, 3)
    for filters in (width * 2, width * 4, width * 8, width * 12):
        x = _residual_block(x, filters, strides=2)
        x = _residual_block(x, filters, strides=1)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    logits = layers.Dense(len(CLASS_NAMES), name="logits")(x)
    return keras.Model(inputs, logits, name="dermnet")


def _conv_bn(x, filters: int, kernel: int, strides: int = 1):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    x = FusedBatchNormalization()(x)
    return layers.Activation("relu")(x)


def _residual_block(x, filters: int, strides: int):
    shortcut = x
    y = layers.SeparableConv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    y = FusedBatchNormalization()(y)
    y = layers.Activation("relu")(y)
    y = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(y)
    y = FusedBatchNormalization()(y)
    if strides != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(shortcut)
        shortcut = FusedBatchNormalization()(shortcut)
    return layers.Activation("relu")(layers.Add()([shortcut, y]))
