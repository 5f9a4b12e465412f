"""Several workers on one PostgreSQL database: each file once, a dead worker's files finished
by another, one leader for reports and alerts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from conftest import Service, totals, wait_until, write_jpeg
from sqlalchemy import update
from sqlalchemy.orm import Session

from dermwatch.config import load_settings
from dermwatch.pipeline.claim import claim
from dermwatch.pipeline.workers import WORKER_PREFIX, Membership
from dermwatch.store.db import ensure_schema, make_engine
from dermwatch.store.models import Worker, utc_now


def on_postgres(config_file: Path, url: str, extra: str = "") -> Path:
    config_file.write_text(config_file.read_text().replace(
        'url = "sqlite:///dermwatch.db"', f'url = "{url}"\nworker_lease_seconds = 3') + extra)
    return config_file


def test_a_dead_workers_claims_go_to_exactly_one_survivor(config_file: Path, postgres_server) -> None:
    settings = load_settings(on_postgres(config_file, postgres_server.new_database()))
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    dead = Membership(engine, settings.paths.work, settings.worker_lease_seconds)
    photo = write_jpeg(settings.paths.intake / "left-behind.jpg", seed=31)
    claimed = claim(photo, dead.work_dir)
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
    on_postgres(config_file, postgres_server.new_database(),
                f"""[alerts]\ncommand = "sh -c 'echo $DERMWATCH_IMAGE_ID >> {sent}'"\n""")
    # Small batches: each worker commits within its first few files, so both take part before the kill.
    config_file.write_text(config_file.read_text().replace(str(tiny_model), str(flag_everything_model))
                           .replace("threads = 1", "threads = 1\nbatch_size = 4"))
    settings = load_settings(config_file)
    workers = [Service(config_file, tmp_path / f"worker-{n}.log") for n in range(2)]
    try:
        for worker in workers:
            worker.wait_ready()
        total = 120
        staging = tmp_path / "staging"
        for i in range(total):
            write_jpeg(staging / f"w{i:03d}.jpg", seed=3000 + i).rename(settings.paths.intake / f"w{i:03d}.jpg")
        wait_until(lambda: totals(settings)["predictions"] >= 15, 60, "the burst under way")
        victim, survivor = workers
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        wait_until(lambda: totals(settings)["predictions"] == total, 120, "every image, the dead worker's too")
        wait_until(lambda: sent.exists() and len(sent.read_text().split()) >= total, 60, "an alert for each")
        time.sleep(2)  # room for a second alert, were there one
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "dermwatch", "status", "--json", "--config", str(config_file)],
            capture_output=True, text=True, timeout=60).stdout)
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
    by_state = {w["state"].split()[0]: w for w in status["workers"]}
    assert set(by_state) == {"alive", "silent"} and by_state["alive"]["leading"]
    assert status["service"] == "1 worker(s) running" and status["images"] == status["predictions"] == total
    for n in range(2):  # both took part
        assert "P(melanoma)" in (tmp_path / f"worker-{n}.log").read_text()
    assert all(not p.name.startswith(WORKER_PREFIX) or not any(p.iterdir()) for p in settings.paths.work.iterdir())
