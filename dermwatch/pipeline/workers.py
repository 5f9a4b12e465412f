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
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dermwatch.errors import DermwatchError
from dermwatch.pipeline.claim import Claimed, reclaim
from dermwatch.store.models import Worker, utc_now

log = logging.getLogger(__name__)

WORKER_PREFIX = "worker-"
#: How long fencing a silent worker waits for its row, before trying again at the next beat.
FENCE_WAIT_MS = 2000
#: PostgreSQL's SQLSTATE for a lock_timeout that ran out.
LOCK_NOT_AVAILABLE = "55P03"
#: pg_try_advisory_lock key of the leader: "dermwatc" as a 64-bit integer.
LEADER_LOCK = 0x6465726D77617463


def cooperative(database_url: str) -> bool:
    """Whether several workers may share this database (PostgreSQL), or one holds it (SQLite)."""
    return make_url(database_url).get_backend_name() == "postgresql"


class LeaseLost(DermwatchError):
    """Another worker found this one silent past its lease, fenced it off and took its claims
    over: what this one holds is no longer its own, and it must record none of it."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"worker {worker_id} was silent past its lease ([database] worker_lease_seconds) and "
                         "another worker took its files over; they are finished there")


class Membership:
    """This process's place among the workers: registry row, own work folder, leadership."""

    def __init__(self, engine: Engine, work_root: Path, lease_seconds: float) -> None:
        self.engine = engine
        self.work_root = work_root
        self.lease = timedelta(seconds=lease_seconds)
        self._leader_connection: Connection | None = None
        self.join()

    def join(self) -> None:
        """Register as a new worker, with a folder of its own."""
        self.id = f"{socket.gethostname()[:32]}-{os.getpid()}-{secrets.token_hex(4)}"
        now = utc_now()
        with Session(self.engine) as session, session.begin():  # registered before its folder exists
            session.add(Worker(id=self.id, host=socket.gethostname(), pid=os.getpid(), started_at=now,
                               heartbeat_at=now, leading=False))
        # Made by the first claim and removed whenever empty (tidy()): a worker killed
        # between batches leaves nothing behind in state/work/.
        self.work_dir = self.work_root / f"{WORKER_PREFIX}{self.id}"
        log.info("worker %s joined", self.id)

    def rejoin(self) -> None:
        """After LeaseLost: give up the lead and whatever was in hand, and start again as a new
        worker. The old claims are the taker's now; the old row stays stopped."""
        self._drop_leadership()
        old = self.id
        self.join()
        log.warning("worker %s was silent past its lease and was taken over; it dropped what it held "
                    "and goes on as worker %s", old, self.id)

    def confirm(self, session: Session) -> None:
        """Renew the lease inside ``session``'s transaction, or raise LeaseLost if this worker was
        fenced off. The row stays locked until the transaction ends, so a worker storing a batch
        and one taking its claims over cannot both win.

        A worker frozen mid-transaction (SIGSTOP, a VM paused) would hold that lock, and the
        rows it inserted, for as long as it is frozen: the server ends such a transaction once
        it has been idle for a lease, so the others can fence it and finish its files."""
        session.execute(text("SELECT set_config('idle_in_transaction_session_timeout', :ms, true)"),
                        {"ms": str(int(self.lease.total_seconds() * 1000))})
        renewed = session.execute(update(Worker).where(Worker.id == self.id, Worker.stopped_at.is_(None))
                                  .values(heartbeat_at=utc_now(), leading=self.leading))
        if renewed.rowcount == 0:
            raise LeaseLost(self.id)

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
            self.confirm(session)

    def _try_to_lead(self) -> None:
        connection = self.engine.connect()
        try:
            won = connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK})
            connection.commit()  # the lock is held by the session, not the transaction
        except Exception:
            connection.close()
            raise
        if won:
            # Named, so that `status` reads who holds the lock from the server itself.
            connection.execute(text("SELECT set_config('application_name', :name, false)"),
                               {"name": leader_name(self.id)})
            connection.commit()
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
                owner = folder.name[len(WORKER_PREFIX):]
                if owner in alive or not folder.is_dir() or not self._fence(owner):
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

    def _fence(self, worker_id: str) -> bool:
        """Mark a silent worker stopped before taking its claims: from then on it can neither
        beat nor store (confirm() raises LeaseLost in it), and its database sessions are ended,
        so that a frozen one holds neither rows nor the lead. False when it beat meanwhile, or
        while it held its row in an open transaction (taken over at the next beat)."""
        try:
            with Session(self.engine) as session, session.begin():
                session.execute(text("SELECT set_config('lock_timeout', :ms, true)"), {"ms": str(FENCE_WAIT_MS)})
                fenced = session.execute(update(Worker).where(Worker.id == worker_id, Worker.stopped_at.is_(None),
                                                              Worker.heartbeat_at < utc_now() - self.lease)
                                         .values(stopped_at=utc_now(), leading=False)).rowcount == 1
                row = session.get(Worker, worker_id)
                stopped = row is None or row.stopped_at is not None
        except OperationalError as error:
            # It froze in the middle of a transaction (SIGSTOP, a paused VM), holding its row;
            # the server cannot always tell (a statement half sent is not idle in transaction).
            if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            fenced = stopped = False
            self._end_sessions_of(worker_id, "it held its registry row in an open transaction")
        if fenced:
            self._end_sessions_of(worker_id, "fenced off")
        return stopped

    def _end_sessions_of(self, worker_id: str, why: str) -> None:
        """End a silent worker's database sessions, its leader's own among them: the rows they
        lock are free, and another worker may lead."""
        with self.engine.begin() as connection:
            worker = connection.execute(select(Worker.host, Worker.pid).where(Worker.id == worker_id)).one_or_none()
            if worker is None:
                return
            ended = connection.scalar(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE application_name IN (:name, :leader) AND pid <> pg_backend_pid()"),
                {"name": worker_session_name(worker.host, worker.pid), "leader": leader_name(worker_id)})
        if ended:
            log.warning("worker %s, silent past its lease (%s): ended %d database session(s) of it",
                        worker_id, why, ended)

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


def worker_session_name(host: str | None = None, pid: int | None = None) -> str:
    """The application_name of a worker's database sessions (this process's, by default), by
    which a survivor finds the sessions of one that froze (PostgreSQL keeps 63 bytes)."""
    return f"dermwatch worker {(host or socket.gethostname())[:32]}-{pid or os.getpid()}"[:63]


def leader_name(worker_id: str) -> str:
    """The application_name of the leader's own connection (PostgreSQL keeps 63 bytes)."""
    return f"dermwatch leader {worker_id}"[:63]


def beat_seconds(lease_seconds: float) -> float:
    """How often a worker beats: three times a lease, and at least every 10 s."""
    return min(10.0, lease_seconds / 3)


def worker_rows(engine: Engine, lease_seconds: float) -> list[dict]:
    """Every worker that has not left, for `dermwatch status`.

    A worker is silent at once when its process is gone from this host, or when it has missed
    two beats; its files go to another worker only when its lease lapses. The leader is who
    holds the advisory lock now, read from the server, not what a dead worker last wrote."""
    now = utc_now()
    lease, missed = timedelta(seconds=lease_seconds), timedelta(seconds=2 * beat_seconds(lease_seconds))
    with Session(engine) as session:
        workers = session.scalars(select(Worker).where(Worker.stopped_at.is_(None)).order_by(Worker.started_at)).all()
        leader = session.scalar(text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :high AND l.objid = :low"),
            {"high": LEADER_LOCK >> 32, "low": LEADER_LOCK & 0xFFFFFFFF})
    rows = []
    for w in workers:
        gone = w.host == socket.gethostname() and not _process_exists(w.pid)
        if gone or now - w.heartbeat_at > missed:
            lapses = w.heartbeat_at + lease
            state = (("stopped (its process is gone)" if gone else "silent") + "; its files go to another worker "
                     + ("now" if now >= lapses else f"when its lease lapses at {lapses:%H:%M:%S} UTC"))
        else:
            state = "alive"
        rows.append({"id": w.id, "host": w.host, "pid": w.pid,
                     "heartbeat_at": w.heartbeat_at.isoformat(timespec="seconds"), "state": state,
                     "leading": state == "alive" and leader == leader_name(w.id)})
    return rows


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
