"""Temperature scaling: one number that makes softmax probabilities mean what they say."""

from __future__ import annotations

import numpy as np

from dermwatch.training.metrics import melanoma_threshold

#: Melanoma sensitivity the alert threshold is chosen for, on validation images.
TARGET_SENSITIVITY = 0.90
THRESHOLD_RULE = f"highest P(melanoma) that flags >= {TARGET_SENSITIVITY:.0%} of validation melanomas"
#: What export chooses on: the pool and every root with enough melanomas to measure must reach
#: the target; the worst of them decides (metrics.worst_root_threshold).
WORST_ROOT_RULE = (f"highest P(melanoma) that flags >= {TARGET_SENSITIVITY:.0%} of the pooled validation melanomas "
                   "and of those of every data root with at least 50 (the worst of them decides)")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probabilities = softmax(logits / temperature)
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels] + 1e-12)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises validation NLL (golden-section on log T)."""
    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a = high - ratio * (high - low)
        b = low + ratio * (high - low)
        if negative_log_likelihood(logits, labels, np.exp(a)) < negative_log_likelihood(logits, labels, np.exp(b)):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def calibrate(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Temperature, melanoma threshold and calibrated probabilities, all from validation."""
    temperature = fit_temperature(logits, labels)
    probabilities = softmax(logits / temperature)
    return temperature, melanoma_threshold(probabilities, labels, TARGET_SENSITIVITY), probabilities
