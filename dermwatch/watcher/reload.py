"""A new model, or new settings, reach a running service without a restart by hand.

The service loads its model (and with it the card's threshold) and its settings once, at
start. It starts over with new ones, in the same process (same PID for systemd), when

- the model file or its card has been replaced: installing a model means copying both, one
  after the other, so the pair is tried only once both have been still for a while and the
  card matches the file; a pair that does not is shown as a fault while the loaded model
  keeps classifying, so a half-copied model never replaces a working one;
- it gets SIGHUP (`systemctl reload dermwatch`): config.toml is read again.

Either way the new settings are checked first (model, database URL, intake): a mistake is a
fault in `status`, and the service goes on as it was.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dermwatch.config import Settings
from dermwatch.errors import DermwatchError, ModelError
from dermwatch.modelcard import card_path, load_card, shipped_model_path
from dermwatch.pipeline.process import check_settings
from dermwatch.watcher.health import Health

#: How long the model and its card must be unchanged before the new pair is tried.
STILL_SECONDS = 2.0

Stamp = tuple[tuple[int, int, int] | None, ...]


def model_stamp(model_path: Path) -> Stamp:
    """What changes when the model file or its card is replaced or rewritten."""
    return tuple(_file_stamp(path) for path in (model_path, card_path(model_path)))


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        facts = os.stat(path)
    except OSError:
        return None
    return facts.st_ino, facts.st_size, facts.st_mtime_ns


class ModelWatch:
    """Looks at the model file on each heartbeat; says when a usable new one is in place."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.loaded = model_stamp(model_path)  # taken before the service loads it: a change later is seen
        self.seen = self.loaded
        self.seen_since = time.monotonic()

    def replaced(self) -> bool:
        """True when the model or its card changed, has been still for STILL_SECONDS, and the
        pair loads; raises ModelError when it is still but unusable (the loaded model stays)."""
        now = model_stamp(self.model_path)
        if now != self.seen:
            self.seen, self.seen_since = now, time.monotonic()
            return False
        if now == self.loaded or time.monotonic() - self.seen_since < STILL_SECONDS:
            return False
        try:
            load_card(self.model_path)
        except ModelError as error:
            raise ModelError(f"{self.model_path} changed but cannot be used ({error}); "
                             "still classifying with the model loaded at start") from None
        return True


class Reload:
    """Asked on each heartbeat whether the service should start over, and with what."""

    def __init__(self, settings: Settings, reread: Callable[[], Settings]) -> None:
        self.reread = reread
        self.requested = threading.Event()  # set by SIGHUP
        self.model = ModelWatch(settings.model.path or shipped_model_path())
        self.reason = ""

    def due(self, health: Health) -> Settings | None:
        """The checked settings to start over with, or None to go on as it is (a reason not to
        is a fault in ``health``)."""
        try:
            replaced = self.model.replaced()
            health.recovered("model")
        except ModelError as error:  # a SIGHUP may still name another model that works
            health.failing("model", str(error), 0)
            replaced = False
        if not (replaced or self.requested.is_set()):
            return None
        self.requested.clear()
        try:
            settings = self.reread()
            check_settings(settings)
        except DermwatchError as error:
            health.failing("reload", f"not started over: {error}; running on the settings it started with", 0)
            return None
        self.reason = f"the model at {self.model.model_path} was replaced" if replaced else "asked to reload (SIGHUP)"
        return settings
