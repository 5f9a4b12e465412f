"""Decode and classify on every core at once, in arrival order, with bounded memory.

Each lane is a thread with its own one-thread LiteRT interpreter. Pillow's decoder and
resize and LiteRT's invoke all release the GIL, so N lanes keep N cores busy, and while the
service's own thread stores one batch the lanes already work on the next. An interpreter
serves one thread at a time: a lane's, or, between two items, the report's heatmaps
(Lanes.predict). All of them share the model's bytes (see pipeline/classifier.py).
"""

from __future__ import annotations

import queue
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from dermwatch.modelcard import ModelCard
from dermwatch.pipeline.classifier import Classifier, load_classifier

#: The interpreter's thread switch interval once lanes run (Python's default is 5 ms). A lane
#: back from Pillow or LiteRT waits for the GIL until the thread holding it lets go; with the
#: service's thread storing a batch, that wait left a core idle. 1 ms: 5 % more images/s on
#: bench/throughput.py (0.2 ms was slower again: switching costs more than it saves).
SWITCH_SECONDS = 0.001

T = TypeVar("T")
R = TypeVar("R")


class Lanes:
    """``count`` threads, each lending its own interpreter to the work it is given."""

    def __init__(self, classifiers: list[Classifier]) -> None:
        self.card: ModelCard = classifiers[0].card
        self._free: queue.SimpleQueue[Classifier] = queue.SimpleQueue()
        for classifier in classifiers:
            self._free.put(classifier)
        self._pool = ThreadPoolExecutor(len(classifiers), thread_name_prefix="lane")

    @property
    def input_size(self) -> int:
        return self.card.input_size

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Classify with the first interpreter a lane is not using, for a thread outside the
        lanes (the report's heatmaps): the service then holds no interpreter beyond one per
        lane, each of which packs its own copy of the weights (13 MiB for the shipped pair)."""
        return self._lend(lambda classifier, batch: classifier.predict(batch), pixels)

    def map(self, work: Callable[[Classifier, T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
        """``work(classifier, item)`` for each item, results in order.

        At most ``ahead`` items are in the lanes or waiting to be collected, so memory is
        bounded however long ``items`` is. Items not started when the caller stops early
        are dropped.
        """
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(self._pool.submit(self._lend, work, item))
                if len(pending) >= max(ahead, 1):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _lend(self, work: Callable[[Classifier, T], R], item: T) -> R:
        classifier = self._free.get()
        try:
            return work(classifier, item)
        finally:
            self._free.put(classifier)


def lane_classifiers(model_path: Path | None, count: int) -> list[Classifier]:
    """``count`` one-thread interpreters on the configured model (or the shipped one), with the
    thread switch interval lanes run at."""
    sys.setswitchinterval(SWITCH_SECONDS)  # process-wide: `run` and `process` are the lanes' own processes
    first = load_classifier(model_path, threads=1)
    return [first, *(first.twin() for _ in range(count - 1))]


def open_lanes(model_path: Path | None, count: int) -> Lanes:
    """``count`` lanes on the configured model (or the shipped one), each with a one-thread interpreter."""
    return Lanes(lane_classifiers(model_path, count))
