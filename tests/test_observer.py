"""The intake observer: real inotify on a real folder, feeding a real settle tracker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until, write_jpeg

from dermwatch.watcher.observer import start_observer
from dermwatch.watcher.settle import SettleTracker


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, SettleTracker]]:
    """An intake folder watched with settle_seconds = 60, so only a whole arrival is taken in time."""
    intake = tmp_path / "intake"
    intake.mkdir()
    tracker = SettleTracker(settle_seconds=60)
    observer = start_observer(intake, tracker, polling=False)
    try:
        yield intake, tracker
    finally:
        observer.stop()
        observer.join()


def _arrive(intake: Path, tracker: SettleTracker, name: str) -> Path:
    staged = write_jpeg(intake.parent / f"staged-{name}", seed=len(name))
    staged.rename(intake / name)
    wait_until(lambda: tracker.pending() == 1, 5, f"the event for {name}")
    return intake / name


def test_a_file_renamed_within_intake_is_whole_at_once(watched: tuple[Path, SettleTracker]) -> None:
    intake, tracker = watched
    _arrive(intake, tracker, "other.jpg").unlink()  # the watch is in place once an event came
    assert tracker.take_ready(10) == []
    part = write_jpeg(intake / "upload.jpg.part", seed=3)
    part.rename(intake / "upload.jpg")
    wait_until(lambda: tracker.take_ready(10) == [intake / "upload.jpg"], 5, "the renamed upload, taken at once")


def test_files_leaving_intake_are_not_events(watched: tuple[Path, SettleTracker]) -> None:
    # The service's own claims move one file out per image: the tracker learns a file is gone
    # when it next looks, not from an event that watchdog holds and pairs for each departure.
    intake, tracker = watched
    arrived = _arrive(intake, tracker, "photo.jpg")
    arrived.rename(intake.parent / "claimed.jpg")
    time.sleep(1.0)  # watchdog holds an unpaired departure for 0.5 s before it reports it
    assert tracker.pending() == 1
    assert tracker.take_ready(10) == []
    assert tracker.pending() == 0
