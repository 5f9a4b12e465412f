"""The lanes that decode and classify: every item once, in order, with a bounded number in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from dermwatch.pipeline.classifier import Classifier
from dermwatch.pipeline.lanes import open_lanes


def test_lanes_keep_order_use_every_interpreter_and_bound_what_is_in_flight(tiny_model: Path) -> None:
    lanes = open_lanes(tiny_model, 2)
    started: list[int] = []
    in_flight, most = 0, 0
    lock = threading.Lock()
    interpreters: set[int] = set()

    def work(classifier: Classifier, item: int) -> tuple[int, np.ndarray]:
        nonlocal in_flight, most
        with lock:
            started.append(item)
            in_flight += 1
            most = max(most, in_flight)
            interpreters.add(id(classifier))
        pixels = np.full((1, classifier.input_size, classifier.input_size, 3), item % 256, dtype=np.uint8)
        probabilities = classifier.predict(pixels)[0]
        time.sleep(0.01 * (item % 3))  # finish out of order
        with lock:
            in_flight -= 1
        return item, probabilities

    try:
        results = list(lanes.map(work, range(40), ahead=6))
        assert [item for item, _ in results] == list(range(40))
        assert all(np.isclose(p.sum(), 1.0, atol=1e-3) for _, p in results)
        assert len(interpreters) == 2 and most == 2

        # A slow caller: the lanes never run more than `ahead` items past it; one that stops
        # early leaves the rest unstarted.
        started.clear()
        for item, _ in lanes.map(work, range(1000), ahead=6):
            time.sleep(0.05)
            assert len(started) <= item + 6 + 1
            if item == 5:
                break
        time.sleep(0.2)
        assert len(started) <= 5 + 6 + 1
    finally:
        lanes.close()
