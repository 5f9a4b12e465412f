"""Several workers on one PostgreSQL database: who is alive, who leads, who finishes the dead's files.

Each worker registers a row and beats on it; its heartbeat is its lease. It claims files
into its own folder, state/work/worker-<id>/, so that a worker that dies leaves its claims
where the others can see whose they were: a survivor moves each claim folder of a dead
worker into its own (one rename, so exactly one survivor gets it) and finishes it, exactly
as a restarted service finishes its own. Reports and alerts are written by one leader,
chosen by a PostgreSQL advisory lock held on a connection of its own: when the leader dies,
its connection closes, the lock is free, and the next worker to ask leads.

With SQLite none of this is used: one service per installation, held by a file lock.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Connection, Engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from dermwatch.pipeline.claim import Claimed, reclaim
from dermwatch.store.models import Worker, utc_now

log = logging.getLogger(__name__)

WORKER_PREFIX = "worker-"
#: pg_try_advisory_lock key of the leader: "dermwatc" as a 64-bit integer.
LEADER_LOCK = 0x6465726D77617463


def cooperative(database_url: str) -> bool:
    """Whether several workers may share this database (PostgreSQL), or one holds it (SQLite)."""
    return make_url(database_url).get_backend_name() == "postgresql"


class Membership:
    """This process's place among the workers: registry row, own work folder, leadership."""

    def __init__(self, engine: Engine, work_root: Path, lease_seconds: float) -> None:
        self.engine = engine
        self.work_root = work_root
        self.lease = timedelta(seconds=lease_seconds)
        self.id = f"{socket.gethostname()[:32]}-{os.getpid()}-{secrets.token_hex(4)}"
        now = utc_now()
        with Session(engine) as session, session.begin():  # registered before its folder exists
            session.add(Worker(id=self.id, host=socket.gethostname(), pid=os.getpid(), started_at=now,
                               heartbeat_at=now, leading=False))
        # Made by the first claim and removed whenever empty (tidy()): a worker killed
        # between batches leaves nothing behind in state/work/.
        self.work_dir = work_root / f"{WORKER_PREFIX}{self.id}"
        self._leader_connection: Connection | None = None
        log.info("worker %s joined", self.id)

    @property
    def leading(self) -> bool:
        return self._leader_connection is not None

    def beat(self, *, may_lead: bool = True) -> None:
        """Renew the lease; unless told not to (a one-off `process`), ask to lead if nobody does."""
        if not self.leading and may_lead:
            self._try_to_lead()
        elif not self._still_leading():
            log.warning("worker %s lost its leader connection; another worker may lead now", self.id)
        with Session(self.engine) as session, session.begin():
            session.execute(update(Worker).where(Worker.id == self.id)
                            .values(heartbeat_at=utc_now(), leading=self.leading))

    def _try_to_lead(self) -> None:
        connection = self.engine.connect()
        try:
            won = connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK})
            connection.commit()  # the lock is held by the session, not the transaction
        except Exception:
            connection.close()
            raise
        if won:
            self._leader_connection = connection
            log.info("worker %s leads: it writes the reports and sends the alerts", self.id)
        else:
            connection.close()

    def _still_leading(self) -> bool:
        try:
            self._leader_connection.scalar(text("SELECT 1"))
            self._leader_connection.commit()
            return True
        except Exception:  # noqa: BLE001 - the connection, and with it the lock, is gone
            self._drop_leadership()
            return False

    def _drop_leadership(self) -> None:
        if self._leader_connection is not None:
            try:
                self._leader_connection.close()
            except Exception:  # noqa: BLE001
                pass
            self._leader_connection = None

    def take_over(self) -> list[Claimed]:
        """Claims of dead workers (and of versions before workers), moved into this worker's folder."""
        alive = self._alive_ids()
        moved: set[str] = set()
        for folder in sorted(self.work_root.iterdir()):
            if folder.name.startswith(WORKER_PREFIX):
                if folder.name[len(WORKER_PREFIX):] in alive or not folder.is_dir():
                    continue
                try:
                    claims = [entry for entry in folder.iterdir() if entry.is_dir()]
                except FileNotFoundError:
                    continue  # another survivor emptied and removed it just now
            elif folder.is_dir():
                claims = [folder]  # a claim folder of a single service from before
            else:
                continue
            if claims:
                self.work_dir.mkdir(parents=True, exist_ok=True)
            for claim_folder in claims:
                try:
                    os.rename(claim_folder, self.work_dir / claim_folder.name)
                except FileNotFoundError:
                    continue  # another survivor took it first
                moved.add(claim_folder.name)
            if folder.name.startswith(WORKER_PREFIX):
                _remove_if_empty(folder)
        # Only what was just moved: this worker's own claims in hand are not taken twice.
        taken = [item for item in reclaim(self.work_dir) if item.token in moved] if moved else []
        if not moved:
            self.tidy()
        if taken:
            log.warning("worker %s took over %d file(s) from stopped or silent workers", self.id, len(taken))
        return taken

    def _alive_ids(self) -> set[str]:
        cutoff = utc_now() - self.lease
        with Session(self.engine) as session:
            return set(session.scalars(select(Worker.id).where(Worker.stopped_at.is_(None),
                                                               Worker.heartbeat_at >= cutoff)))

    def tidy(self) -> None:
        """Remove this worker's folder while it holds no claim."""
        _remove_if_empty(self.work_dir)

    def leave(self) -> None:
        """Stopped cleanly: give up the lead and say so, so that others need not wait out the lease."""
        self._drop_leadership()
        with Session(self.engine) as session, session.begin():
            session.execute(update(Worker).where(Worker.id == self.id).values(stopped_at=utc_now(), leading=False))
        _remove_if_empty(self.work_dir)
        log.info("worker %s left", self.id)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def worker_rows(engine: Engine, lease_seconds: float) -> list[dict]:
    """Every worker that has not left, for `dermwatch status`: alive, or silent past its lease."""
    cutoff = utc_now() - timedelta(seconds=lease_seconds)
    with Session(engine) as session:
        workers = session.scalars(select(Worker).where(Worker.stopped_at.is_(None)).order_by(Worker.started_at))
        return [{"id": w.id, "host": w.host, "pid": w.pid, "heartbeat_at": w.heartbeat_at.isoformat(timespec="seconds"),
                 "state": "alive" if w.heartbeat_at >= cutoff else "silent (its files go to another worker)",
                 "leading": w.leading and w.heartbeat_at >= cutoff} for w in workers]
