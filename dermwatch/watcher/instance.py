"""One service per installation: an flock on the state folder (and on a SQLite database).

Two services on one state folder would claim each other's files and send every alert
twice. The lock is held for the life of the process and released by the kernel however
the process ends, so a kill -9 never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from dermwatch.config import Settings
from dermwatch.errors import AlreadyRunning

LOCK_NAME = "dermwatch.lock"


def lock_paths(settings: Settings) -> list[Path]:
    """The state folder's lock file, and one beside a SQLite database file."""
    paths = [settings.paths.state / LOCK_NAME]
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        paths.append(Path(url.database).with_name(Path(url.database).name + ".lock"))
    return paths


class InstanceLock:
    """Held while the service runs; refuses at once, naming the PID that holds it."""

    def __init__(self, settings: Settings) -> None:
        self._handles = []
        try:
            for path in lock_paths(settings):
                self._handles.append(_acquire(path))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()


def holder(settings: Settings) -> int | None:
    """PID of the service holding this installation, or None when none runs."""
    for path in lock_paths(settings):
        try:
            with path.open("r") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return _pid_in(path)
        except OSError:
            continue
    return None


def service_running(settings: Settings, engine: Engine) -> bool:
    """Whether a service works on this installation: the lock's holder (SQLite), or a worker
    whose lease has not lapsed (PostgreSQL)."""
    from dermwatch.pipeline.workers import cooperative, worker_rows

    if not cooperative(settings.database_url):
        return holder(settings) is not None
    return any(worker["state"] == "alive" for worker in worker_rows(engine, settings.worker_lease_seconds))


def _acquire(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        pid = _pid_in(path)
        raise AlreadyRunning(
            f"another dermwatch service{f' (PID {pid})' if pid else ''} is running on this installation "
            f"(lock {path}); stop it first, or give this one its own [paths] state and [database] url"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None
