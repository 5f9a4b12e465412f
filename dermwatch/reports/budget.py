"""A share of one core for the report's pictures, so that rendering never crowds out intake.

Thumbnails and occlusion heatmaps (65 forward passes each) are the report's heavy work. In
the service they run beside the lanes that classify arrivals; after each picture the report
thread rests long enough that its CPU time is at most ``share`` of the time that passed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class CpuBudget:
    def __init__(self, share: float, stopping: threading.Event | None = None) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"a CPU share is more than 0 and at most 1 (one core), got {share}")
        self.share = share
        self._rest = stopping or threading.Event()  # a stop ends the rest at once

    @contextmanager
    def spend(self) -> Iterator[None]:
        """Run the block, then rest for what keeps its thread's CPU time within the share."""
        started = time.thread_time()
        yield
        used = time.thread_time() - started
        self._rest.wait(used * (1 / self.share - 1))
