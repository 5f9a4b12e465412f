"""What is going wrong right now, for STATUS=, the log and `dermwatch status`.

Parts of the service (intake, reports, alerts) report a passing fault here while they wait
it out, and clear it when it passes. The log gets one line when a fault starts, changes or
ends, not one per retry.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dermwatch.store.models import utc_now

log = logging.getLogger(__name__)

STATUS_FILE = "service.json"
#: Fixed size of the status file: rewritten in place, never grown.
STATUS_FILE_BYTES = 8192


def worker_status_file(worker_id: str) -> str:
    """Each of several workers sharing a state folder publishes its own status file."""
    return f"service-{worker_id}.json"


@dataclass(frozen=True)
class Fault:
    message: str
    since: datetime
    retry_in: float  # seconds


#: A service loop turn longer than this is shown as a fault: a step takes at most a few seconds.
STALL_SECONDS = 10.0


class Health:
    def __init__(self, status_file: str = STATUS_FILE, model: str = "") -> None:
        self.status_file = status_file
        self.model = model  # the model this process classifies with, for `status`
        self._faults: dict[str, Fault] = {}
        self._warnings: dict[str, str] = {}  # not faults: the service works, but someone should look
        self._lock = threading.Lock()
        self._status_fd: int | None = None
        self._write_lock = threading.Lock()  # the loop and the StallWatch both publish
        self.looped_at = time.monotonic()  # the service loop's last turn
        self.line = "starting"  # its last status line

    def failing(self, part: str, message: str, retry_in: float) -> None:
        with self._lock:
            previous = self._faults.get(part)
            since = previous.since if previous else utc_now()
            self._faults[part] = Fault(message, since, retry_in)
        if previous is None or previous.message != message:
            log.error("%s: %s; retrying, nothing is lost", part, message)

    def recovered(self, part: str) -> None:
        with self._lock:
            previous = self._faults.pop(part, None)
        if previous is not None:
            log.warning("%s: working again after %s", part, previous.message)

    def warn(self, part: str, message: str | None) -> None:
        """Set (or, with None, clear) a standing warning; logged when it starts or changes."""
        with self._lock:
            previous = self._warnings.pop(part, None)
            if message:
                self._warnings[part] = message
        if message and message != previous:
            log.warning("%s: %s", part, message)

    def faults(self) -> dict[str, Fault]:
        with self._lock:
            return dict(self._faults)

    def summary(self) -> str:
        """One line for systemd's STATUS=: empty when all is well."""
        with self._lock:
            warnings = sorted(self._warnings.items())
        return "; ".join([
            *(f"{part} waiting since {fault.since:%H:%M:%S} UTC: {fault.message}"
              for part, fault in sorted(self.faults().items())),
            *(f"warning ({part}): {message}" for part, message in warnings),
        ])

    def publish(self, state_dir: Path, status_line: str) -> None:
        """state/service.json, read by `dermwatch status`.

        Written in place over blocks allocated at start-up, so that a full disk, the fault
        most worth showing, does not stop it being shown.
        """
        document = {
            "pid": os.getpid(),
            "updated_at": utc_now().isoformat(timespec="seconds"),
            "status": status_line[:2000],
            "model": self.model,
            "faults": {part: {"message": f.message[:1000], "since": f.since.isoformat(timespec="seconds")}
                       for part, f in self.faults().items()},
        }
        data = json.dumps(document).encode()[:STATUS_FILE_BYTES - 1]
        self.line = status_line
        with self._write_lock:
            self._write(state_dir, data)

    def _write(self, state_dir: Path, data: bytes) -> None:
        try:
            if self._status_fd is None:
                self._status_fd = os.open(state_dir / self.status_file, os.O_RDWR | os.O_CREAT, 0o666)
                os.pwrite(self._status_fd, b" " * STATUS_FILE_BYTES, 0)
            os.pwrite(self._status_fd, data.ljust(STATUS_FILE_BYTES - 1) + b"\n", 0)
        except OSError as error:
            log.debug("cannot write %s: %s", state_dir / self.status_file, error)

    def close(self) -> None:
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None


class StallWatch(threading.Thread):
    """Shows at once when the service loop is held up inside one call, which it cannot say
    itself while it waits: a write waiting busy_timeout_seconds for a locked database, a hung
    network share. Only the loop feeds systemd's watchdog; this only publishes."""

    def __init__(self, health: Health, state_dir: Path, stop: threading.Event,
                 doing: Callable[[], str]) -> None:
        super().__init__(name="stall watch", daemon=True)
        self.health, self.state_dir, self.stop, self.doing = health, state_dir, stop, doing

    def run(self) -> None:
        while not self.stop.wait(1.0):
            held = time.monotonic() - self.health.looped_at
            if held >= STALL_SECONDS:
                self.health.failing("intake", f"no progress for over {STALL_SECONDS:.0f} s: {self.doing()}", 0)
                self.health.publish(self.state_dir, self.health.line)


class Backoff:
    """1, 2, 4 … seconds between retries, at most ``ceiling``; reset once a try succeeds."""

    def __init__(self, first: float = 1.0, ceiling: float = 60.0) -> None:
        self.first, self.ceiling = first, ceiling
        self.current = 0.0

    def next(self) -> float:
        self.current = min(self.ceiling, self.current * 2 if self.current else self.first)
        return self.current

    def reset(self) -> None:
        self.current = 0.0
