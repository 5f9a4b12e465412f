"""Cross-entropy on integer labels with label smoothing, which Keras offers only on one-hot labels.

Every batch pipeline yields integer labels; smoothing keeps a fine-tuned network from growing
over-confident on a few thousand images. Registered, so a checkpoint that names it loads again.
"""

from __future__ import annotations

import keras

from dermwatch.labels import CLASS_NAMES


@keras.saving.register_keras_serializable(package="dermwatch")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Softmax cross-entropy of logits against integer labels smoothed by ``label_smoothing``."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), len(CLASS_NAMES))
        return keras.losses.categorical_crossentropy(one_hot, y_pred, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
