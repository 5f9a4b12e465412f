"""Score and checkpoint the moving average of the weights, train the raw ones.

Keras' own SwapEMAWeights hands a variable the very buffer of its average; on JAX the next
``predict`` donates that buffer, and the run dies with "Array has been deleted". This swap
copies through NumPy, and takes where the average is (model or optimizer) as an argument,
so a run resumed from a checkpoint written with the average in the model swaps correctly.
"""

from __future__ import annotations

import keras


class SwapEMAWeights(keras.callbacks.Callback):
    """At each epoch's end the average goes into the model (for scoring, keeping and the
    checkpoint); at the next epoch's start the raw weights come back for training."""

    def __init__(self, average_in_model: bool = False) -> None:
        super().__init__()
        self.average_in_model = average_in_model

    def _swap(self) -> None:
        optimizer = self.model.optimizer
        # The optimizer keeps each trainable variable's average in the same order as the
        # variables it trains (Keras' own callback pairs them the same way).
        for variable, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average,
                                     strict=True):
            raw = keras.ops.convert_to_numpy(variable)
            variable.assign(keras.ops.convert_to_numpy(average))
            average.assign(raw)
        self.average_in_model = not self.average_in_model

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.average_in_model:
            self._swap()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.average_in_model:
            self._swap()
