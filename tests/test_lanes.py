"""The lanes that decode and classify: every item once, in order, with a bounded number in flight."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dermwatch.errors import ModelError
from dermwatch.modelcard import card_path, load_card
from dermwatch.pipeline.classifier import Classifier
from dermwatch.pipeline.lanes import Lanes, lane_classifiers, open_lanes


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


def test_a_batch_is_classified_one_image_per_invoke_as_each_image_alone(tiny_model: Path) -> None:
    """A heatmap's 65-image batch once grew the interpreter's activations 65-fold (the service
    went from 106 to 406 MiB); now the interpreter keeps its one-image input for life."""
    classifier = lane_classifiers(tiny_model, 1)[0]
    size = classifier.input_size
    batch = np.random.default_rng(0).integers(0, 256, (65, size, size, 3), dtype=np.uint8)
    together = classifier.predict(batch)
    alone = np.concatenate([classifier.predict(image[np.newaxis]) for image in batch])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    assert together.shape == (65, 9)
    assert classifier._interpreter.get_input_details()[0]["shape"][0] == 1


def test_the_report_borrows_a_free_lane_interpreter_and_all_share_one_copy_of_the_model(tiny_model: Path) -> None:
    classifiers = lane_classifiers(tiny_model, 2)
    assert classifiers[1].content is classifiers[0].content
    lanes = Lanes(classifiers)
    size = lanes.input_size
    pixels = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    release = threading.Event()
    busy: list[int] = []

    def hold(classifier: Classifier, item: int) -> int:
        busy.append(item)
        release.wait(10)
        return item

    try:
        np.testing.assert_allclose(lanes.predict(pixels), classifiers[0].predict(pixels), atol=1e-6)
        # While both lanes hold their interpreters, the report's call waits for one: it never
        # shares an interpreter with a lane, and there is no third one.
        held = threading.Thread(target=lambda: list(lanes.map(hold, range(2), ahead=2)))
        held.start()
        while len(busy) < 2:
            time.sleep(0.01)
        borrowed: list[np.ndarray] = []
        borrower = threading.Thread(target=lambda: borrowed.append(lanes.predict(pixels)))
        borrower.start()
        borrower.join(0.3)
        assert borrower.is_alive() and not borrowed
        release.set()
        borrower.join(10)
        held.join(10)
        assert len(borrowed) == 1 and borrowed[0].shape == (3, 9)
    finally:
        release.set()
        lanes.close()


def test_a_model_replaced_after_its_card_was_checked_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.tflite"
    shutil.copy(tiny_model, model)
    shutil.copy(card_path(tiny_model), card_path(model))
    card = load_card(model)
    model.write_bytes(tiny_model.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="changed after its card was checked"):
        Classifier(model, card, threads=1)
