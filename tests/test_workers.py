"""Several workers on one PostgreSQL database: each file once, a dead worker's files finished
by another, one leader for reports and alerts."""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Service, status_json, totals, wait_until, write_jpeg
from sqlalchemy import text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dermwatch.config import Settings, load_settings
from dermwatch.pipeline.claim import ClaimFolders, claim
from dermwatch.pipeline.workers import WORKER_PREFIX, LeaseLost, Membership, worker_session_name
from dermwatch.store.db import ensure_schema, make_engine
from dermwatch.store.models import Worker, utc_now


def on_postgres(config_file: Path, url: str, extra: str = "", lease_seconds: float = 3) -> Path:
    config_file.write_text(config_file.read_text().replace(
        'url = "sqlite:///dermwatch.db"', f'url = "{url}"\nworker_lease_seconds = {lease_seconds}') + extra)
    return config_file


def two_flagging_workers(config_file: Path, tiny_model: Path, flag_everything_model: Path, url: str, tmp_path: Path,
                         extra: str = "", lease_seconds: float = 3) -> tuple[Settings, list[Service]]:
    """Two `dermwatch run` workers on ``url``, ready, flagging every image. Small batches: each
    commits within its first few files, so both take part in a burst."""
    on_postgres(config_file, url, extra, lease_seconds)
    config_file.write_text(config_file.read_text().replace(str(tiny_model), str(flag_everything_model))
                           .replace("threads = 1", "threads = 1\nbatch_size = 4"))
    workers = [Service(config_file, tmp_path / f"worker-{n}.log") for n in range(2)]
    try:
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.discard()
        raise
    return load_settings(config_file), workers


def test_a_worker_frozen_inside_a_transaction_is_cut_off_and_its_files_taken_over(config_file: Path,
                                                                                postgres_server) -> None:
    """A worker frozen while its transaction holds its registry row (a statement half sent is
    not idle in transaction, so the server waits for it): the survivor ends its sessions
    instead of waiting for ever, and takes its files over at the next beat."""
    settings = load_settings(on_postgres(config_file, postgres_server.new_database()))
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    frozen_engine = make_engine(settings.database_url, session_name=worker_session_name())
    frozen = Membership(frozen_engine, settings.paths.work, settings.worker_lease_seconds)
    claimed = claim(write_jpeg(settings.paths.intake / "in-hand.jpg", seed=32), frozen.work_dir, ClaimFolders())
    with Session(engine) as session, session.begin():  # silent for longer than the lease
        session.execute(update(Worker).where(Worker.id == frozen.id)
                        .values(heartbeat_at=utc_now() - timedelta(seconds=10)))
    held = frozen_engine.connect()  # ...and frozen in the middle of a transaction on its row
    held.execute(update(Worker).where(Worker.id == frozen.id).values(leading=False))

    survivor = Membership(engine, settings.paths.work, settings.worker_lease_seconds)
    assert survivor.take_over() == []  # its row was held: its sessions ended, not waited for
    with pytest.raises(OperationalError):
        held.execute(text("SELECT 1"))
    held.close()
    assert [item.token for item in survivor.take_over()] == [claimed.token]
    with pytest.raises(LeaseLost):
        frozen.beat(may_lead=False)
    frozen_engine.dispose()
    engine.dispose()


def test_a_dead_workers_claims_go_to_exactly_one_survivor(config_file: Path, postgres_server) -> None:
    settings = load_settings(on_postgres(config_file, postgres_server.new_database()))
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    dead = Membership(engine, settings.paths.work, settings.worker_lease_seconds)
    photo = write_jpeg(settings.paths.intake / "left-behind.jpg", seed=31)
    claimed = claim(photo, dead.work_dir, ClaimFolders())
    with Session(engine) as session, session.begin():  # silent for longer than the lease
        session.execute(update(Worker).where(Worker.id == dead.id)
                        .values(heartbeat_at=utc_now() - timedelta(seconds=10)))
    first, second = (Membership(engine, settings.paths.work, settings.worker_lease_seconds) for _ in range(2))
    taken = first.take_over()
    assert [item.original_name for item in taken] == ["left-behind.jpg"]
    assert taken[0].work_path == first.work_dir / claimed.token / "left-behind.jpg"
    assert second.take_over() == [] and not dead.work_dir.exists()
    assert first.take_over() == []  # its own claims in hand are not taken twice


def test_two_workers_share_a_burst_and_a_killed_one_costs_nothing(config_file: Path, tiny_model: Path,
                                                                 flag_everything_model: Path, postgres_server,
                                                                 tmp_path: Path) -> None:
    sent = tmp_path / "alerts.log"
    settings, workers = two_flagging_workers(
        config_file, tiny_model, flag_everything_model, postgres_server.new_database(), tmp_path,
        f"""[alerts]\ncommand = "sh -c 'echo $DERMWATCH_IMAGE_ID >> {sent}'"\n""",
        lease_seconds=15)  # `status` must read the killed worker before its lease lapses, even on a busy machine
    try:
        total = 120
        staging = tmp_path / "staging"
        for i in range(total):
            write_jpeg(staging / f"w{i:03d}.jpg", seed=3000 + i).rename(settings.paths.intake / f"w{i:03d}.jpg")
        # Killed only once both have classified: on a busy machine one worker can take the
        # first dozens of files before the other gets a core.
        logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
        wait_until(lambda: all("P(melanoma)" in log.read_text() for log in logs), 60, "both workers classifying")
        victim, survivor = workers
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        at_once = status_json(config_file)  # inside the 15 s lease: shown stopped at once, and not leading
        by_pid = {w["pid"]: w for w in at_once["workers"]}
        assert by_pid[victim.process.pid]["state"].startswith("stopped (its process is gone)")
        assert not by_pid[victim.process.pid]["leading"] and by_pid[survivor.process.pid]["state"] == "alive"
        assert at_once["service"] == "1 worker(s) running"
        wait_until(lambda: totals(settings)["predictions"] == total, 120, "every image, the dead worker's too")
        wait_until(lambda: sent.exists() and len(sent.read_text().split()) >= total, 60, "an alert for each")
        time.sleep(2)  # room for a second alert, were there one
        status = status_json(config_file)
        assert survivor.stop() == 0
    finally:
        for worker in workers:
            worker.discard()
    counts = totals(settings)
    assert (counts["images"], counts["predictions"], counts["sightings"], counts["quarantined"]) == (
        total, total, total, 0)
    ids = sent.read_text().split()
    assert len(ids) == len(set(ids)) == total  # one leader sends, each alert once
    assert list(settings.paths.intake.iterdir()) == []
    assert [p for p in settings.paths.work.rglob("*") if p.is_file()] == []
    # The dead worker, fenced off when its files were taken over, is no longer listed.
    (listed,) = status["workers"]
    assert listed["pid"] == survivor.process.pid and listed["state"] == "alive" and listed["leading"]
    assert status["service"] == "1 worker(s) running" and status["images"] == status["predictions"] == total
    assert all(not p.name.startswith(WORKER_PREFIX) or not any(p.iterdir()) for p in settings.paths.work.iterdir())


def test_a_worker_frozen_past_its_lease_records_nothing_it_held_and_goes_on(
        config_file: Path, tiny_model: Path, flag_everything_model: Path, postgres_server, tmp_path: Path) -> None:
    """SIGSTOP a worker holding claims for longer than its lease, then SIGCONT it: the other has
    finished its files by then; the woken one finds it was fenced off, stores none of what it
    held (no rejection, no second row) and goes on taking new files as a new worker."""
    settings, workers = two_flagging_workers(config_file, tiny_model, flag_everything_model,
                                             postgres_server.new_database(), tmp_path)
    try:
        staging, first, more = tmp_path / "staging", 80, 20
        for i in range(first):
            write_jpeg(staging / f"f{i:03d}.jpg", seed=5000 + i).rename(settings.paths.intake / f"f{i:03d}.jpg")

        def holder() -> Service | None:
            for folder in settings.paths.work.glob(f"{WORKER_PREFIX}*"):
                if any(folder.iterdir()):
                    pid = int(folder.name.split("-")[-2])
                    return next((w for w in workers if w.process.pid == pid), None)
            return None

        wait_until(lambda: holder() is not None, 60, "a worker holding claims")
        frozen = holder()
        frozen.process.send_signal(signal.SIGSTOP)
        wait_until(lambda: totals(settings)["predictions"] == first, 120, "every file, the frozen worker's too")
        time.sleep(4)  # well past its 3 s lease
        frozen.process.send_signal(signal.SIGCONT)
        wait_until(lambda: "was silent past its lease and was taken over" in frozen.log_path.read_text(), 30,
                   "the woken worker noticing it was taken over")
        for i in range(more):
            write_jpeg(staging / f"m{i:03d}.jpg", seed=6000 + i).rename(settings.paths.intake / f"m{i:03d}.jpg")
        wait_until(lambda: totals(settings)["predictions"] == first + more, 60, "the new files")
        status = status_json(config_file)
        assert [w["state"] for w in status["workers"]] == ["alive", "alive"]
        for worker in workers:
            assert worker.stop() == 0
    finally:
        for worker in workers:
            worker.discard()
    counts = totals(settings)
    assert (counts["images"], counts["predictions"], counts["sightings"], counts["quarantined"]) == (
        first + more, first + more, first + more, 0)
    assert list(settings.paths.intake.iterdir()) == []
    assert [p for p in settings.paths.work.rglob("*") if p.is_file()] == []
    assert len(list(settings.paths.archive.rglob("*.jpg"))) == first + more
