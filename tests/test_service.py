"""`dermwatch run` as a real subprocess on real folders: bursts, slow writers, kills, signals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import status_json, totals, wait_until, write_jpeg
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from dermwatch.config import Settings, load_settings
from dermwatch.pipeline.workers import WORKER_PREFIX
from dermwatch.store.models import Image as ImageRow
from dermwatch.store.models import Sighting


def drop(intake: Path, name: str, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    """Write elsewhere in the same filesystem, then rename in: how a careful client delivers."""
    staging = intake.parent / "staging"
    staging.mkdir(exist_ok=True)
    return write_jpeg(staging / name, seed, size).rename(intake / name)


def nothing_left_in_work(settings: Settings) -> bool:
    """No claim left in state/work/. On PostgreSQL a killed worker's folder, empty, stays until
    its lease runs out; that is all that may remain."""
    leftovers = [p for p in settings.paths.work.rglob("*") if p.is_file()]
    folders = [p for p in settings.paths.work.iterdir() if not p.name.startswith(WORKER_PREFIX)]
    return leftovers == folders == []


def all_outcomes(settings: Settings) -> int:
    counts = totals(settings)
    return counts["sightings"] + counts["quarantined"]


def test_ready_is_sent_over_notify_socket_and_sigterm_exits_zero(start_service, settings: Settings) -> None:
    service = start_service()
    assert "READY=1" in service.lines()
    assert service.stop() == 0


def test_burst_of_200_images_gives_200_predictions(start_service, any_database_config: Path) -> None:
    settings = load_settings(any_database_config)
    service = start_service()
    for i in range(200):
        write_jpeg(settings.paths.intake / f"burst-{i:03d}.jpg", seed=1000 + i)
    wait_until(lambda: totals(settings)["predictions"] == 200, 120, "200 predictions")
    # The emptied claim folders kept for the burst go once the intake is idle, service still running.
    wait_until(lambda: list(settings.paths.work.iterdir()) == [], 10, "state/work/ empty while idle")
    assert service.stop() == 0
    counts = totals(settings)
    assert (counts["images"], counts["sightings"], counts["quarantined"]) == (200, 200, 0)
    assert list(settings.paths.intake.iterdir()) == [] and list(settings.paths.work.iterdir()) == []
    assert sum(1 for _ in settings.paths.archive.rglob("*.jpg")) == 200


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_file_written_slowly_is_processed_once_when_complete(config_file: Path, start_service, polling: bool) -> None:
    if polling:
        config_file.write_text(config_file.read_text() + "polling = true\n")
    settings = load_settings(config_file)
    service = start_service()
    data = write_jpeg(config_file.parent / "whole.jpg", seed=7, size=(640, 480)).read_bytes()
    target = settings.paths.intake / "slow.jpg"
    with target.open("wb") as handle:
        for i in range(12):  # 12 chunks, 0.25 s apart: about 3 s
            handle.write(data[i * len(data) // 12 : (i + 1) * len(data) // 12])
            handle.flush()
            time.sleep(0.25)
            assert totals(settings)["predictions"] + totals(settings)["quarantined"] == 0
    wait_until(lambda: all_outcomes(settings) == 1, 30, "the slow file processed")
    time.sleep(1.5)
    assert service.stop() == 0
    counts = totals(settings)
    assert (counts["predictions"], counts["quarantined"]) == (1, 0)
    with Session(create_engine(settings.database_url)) as session:
        assert session.scalars(select(ImageRow)).one().bytes == len(data)


def test_a_file_renamed_into_intake_is_taken_at_once(config_file: Path, start_service) -> None:
    # Renamed in whole (the way a careful uploader finishes): no quiet period to wait out.
    config_file.write_text(config_file.read_text().replace("settle_seconds = 0.5", "settle_seconds = 60"))
    settings = load_settings(config_file)
    service = start_service()
    staged = write_jpeg(config_file.parent / "staged.jpg", seed=41)
    staged.rename(settings.paths.intake / "renamed.jpg")
    wait_until(lambda: totals(settings)["predictions"] == 1, 15, "the renamed file, long before settle_seconds")
    assert service.stop() == 0


def test_same_bytes_dropped_twice_into_the_service(start_service, settings: Settings) -> None:
    service = start_service()
    first = drop(settings.paths.intake, "first.jpg", seed=21)
    wait_until(lambda: totals(settings)["sightings"] == 1, 30, "first sighting")
    copy = settings.paths.intake.parent / "copy.jpg"
    copy.write_bytes((settings.paths.archive.rglob("*-first.jpg").__next__()).read_bytes())
    copy.rename(settings.paths.intake / "second.jpg")
    wait_until(lambda: totals(settings)["sightings"] == 2, 30, "second sighting")
    assert service.stop() == 0
    counts = totals(settings)
    assert (counts["images"], counts["predictions"], counts["sightings"]) == (1, 1, 2)
    assert not first.exists()


def test_ignored_names_stay_in_intake(start_service, settings: Settings) -> None:
    service = start_service()
    for name in (".hidden.jpg", "~lock.jpg", "upload.jpg.part", "upload.tmp", "orphan.json"):
        (settings.paths.intake / name).write_bytes(b"not yet")
    drop(settings.paths.intake, "real.jpg", seed=22)
    wait_until(lambda: totals(settings)["sightings"] == 1, 30, "the real image")
    time.sleep(1.0)
    assert service.stop() == 0
    assert sorted(p.name for p in settings.paths.intake.iterdir()) == sorted(
        [".hidden.jpg", "~lock.jpg", "upload.jpg.part", "upload.tmp", "orphan.json"])
    assert totals(settings)["quarantined"] == 0


def test_files_already_waiting_are_taken_by_the_startup_scan(start_service, settings: Settings) -> None:
    settings.paths.intake.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        write_jpeg(settings.paths.intake / "sub" / f"early-{i}.jpg", seed=30 + i)
    service = start_service()
    wait_until(lambda: totals(settings)["predictions"] == 5, 30, "5 early files")
    assert service.stop() == 0


@pytest.mark.parametrize("kill_after", [3, 25, 60, 110], ids=lambda n: f"after-{n}")
def test_kill_9_mid_burst_then_restart_processes_every_image_exactly_once(start_service, config_file: Path,
                                                                          kill_after: int) -> None:
    kill_mid_burst_and_restart(start_service, load_settings(config_file), kill_after)


def test_kill_9_mid_burst_on_postgresql_loses_and_doubles_nothing(start_service, config_file: Path,
                                                                   postgres_server) -> None:
    url = postgres_server.new_database()
    # A short lease: a batch the killed worker committed but had not archived yet waits in its
    # folder until the lease runs out, and the restarted worker (a new one) then finishes it.
    config_file.write_text(config_file.read_text().replace(
        'url = "sqlite:///dermwatch.db"', f'url = "{url}"\nworker_lease_seconds = 3'))
    kill_mid_burst_and_restart(start_service, load_settings(config_file), kill_after=25)


def kill_mid_burst_and_restart(start_service, settings: Settings, kill_after: int) -> None:
    service = start_service()
    total = 150
    writer = threading.Thread(
        target=lambda: [drop(settings.paths.intake, f"k{i:03d}.jpg", seed=5000 + i) for i in range(total)]
    )
    writer.start()
    wait_until(lambda: totals(settings)["sightings"] >= kill_after, 90, f"{kill_after} images before the kill")
    service.process.send_signal(signal.SIGKILL)
    service.process.wait()
    service.close()
    writer.join()
    restarted = start_service()
    wait_until(lambda: totals(settings)["sightings"] == total, 120, "every image after restart")
    # Recorded is not yet archived: a batch committed just before the kill is moved on by
    # the restart (SQLite) or by the next worker once the dead one's lease ends (PostgreSQL).
    wait_until(lambda: sum(1 for _ in settings.paths.archive.rglob("*.jpg")) == total, 60, "every image archived")
    time.sleep(1.0)
    assert restarted.stop() == 0
    counts = totals(settings)
    assert (counts["images"], counts["predictions"], counts["sightings"], counts["quarantined"]) == (
        total, total, total, 0)
    with Session(create_engine(settings.database_url)) as session:
        names = session.scalars(select(Sighting.original_name)).all()
        assert sorted(names) == [f"k{i:03d}.jpg" for i in range(total)]
        assert session.scalar(select(func.count(func.distinct(ImageRow.sha256)))) == total
    assert nothing_left_in_work(settings)
    assert sum(1 for _ in settings.paths.archive.rglob("*.jpg")) == total


def test_sigterm_mid_burst_exits_zero_and_leaves_nothing_half_done(start_service, settings: Settings) -> None:
    service = start_service()
    for i in range(60):
        drop(settings.paths.intake, f"t{i:02d}.jpg", seed=7000 + i)
    wait_until(lambda: totals(settings)["sightings"] >= 5, 60, "some images processed")
    assert service.stop() == 0
    done = totals(settings)["sightings"]
    # Everything is either finished (archived with a row) or untouched in intake.
    assert list(settings.paths.work.iterdir()) == []
    assert sum(1 for _ in settings.paths.archive.rglob("*.jpg")) == done
    assert len(list(settings.paths.intake.iterdir())) == 60 - done


def _flagged(settings: Settings) -> int:
    return totals(settings)["flagged"]


def test_a_new_model_reaches_the_running_service_without_a_restart(
        start_service, config_file: Path, tiny_model: Path, flag_everything_model: Path, tmp_path: Path) -> None:
    """Copying a new model and card over the configured ones, as IT would: a card that does not
    match its file is a fault and the loaded model goes on; a matching pair is taken up by the
    same process within seconds, threshold and all, with nothing in hand lost."""
    model = tmp_path / "models" / "clinic.tflite"
    model.parent.mkdir()
    for source, target in ((tiny_model, model), (tiny_model.with_suffix(".json"), model.with_suffix(".json"))):
        shutil.copyfile(source, target)
    config_file.write_text(config_file.read_text().replace(str(tiny_model), str(model)))
    settings = load_settings(config_file)
    service = start_service()
    drop(settings.paths.intake, "before.jpg", seed=1)
    wait_until(lambda: totals(settings)["predictions"] == 1, 60, "the first image classified")
    assert _flagged(settings) == 0 and status_json(config_file)["threshold"] == 0.5
    assert status_json(config_file)["service_model"].startswith("tiny-test-model test ")

    card = json.loads(flag_everything_model.with_suffix(".json").read_text())
    model.with_suffix(".json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    wait_until(lambda: "model" in status_json(config_file)["faults"], 30, "a card that does not match shown as a fault")
    assert "cannot be used" in status_json(config_file)["faults"]["model"]["message"]
    drop(settings.paths.intake, "during.jpg", seed=2)
    wait_until(lambda: totals(settings)["predictions"] == 2, 60, "classified by the loaded model meanwhile")
    assert _flagged(settings) == 0

    shutil.copyfile(flag_everything_model, model)
    model.with_suffix(".json").write_text(json.dumps({**card, "version": "2"}))
    wait_until(lambda: status_json(config_file)["service_model"].startswith("tiny-test-model 2 "), 60,
               "the service on the new model")
    assert status_json(config_file)["threshold"] == 1e-6
    drop(settings.paths.intake, "after.jpg", seed=3)
    wait_until(lambda: _flagged(settings) == 1, 60, "the next image judged by the new model")
    assert service.process.poll() is None  # the same process: systemd sees RELOADING=1, then READY=1
    lines = service.lines()
    assert "RELOADING=1" in lines and lines.count("READY=1") == 2
    assert status_json(config_file)["faults"] == {}
    assert service.stop() == 0
    assert totals(settings)["sightings"] == 3


def test_sighup_reads_the_configuration_again_and_a_mistake_leaves_the_service_as_it_was(
        start_service, config_file: Path, settings: Settings, tiny_model: Path, flag_everything_model: Path) -> None:
    service = start_service()
    good = config_file.read_text()
    readable = config_file.with_name("readable.toml")  # for `status` while config.toml has a mistake
    readable.write_text(good)
    config_file.write_text(good.replace("[watcher]", "[images]\nmax_pixels = \"many\"\n[watcher]"))
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload" in status_json(readable)["faults"], 30, "the mistake shown as a fault")
    assert "max_pixels" in status_json(readable)["faults"]["reload"]["message"]
    drop(settings.paths.intake, "meanwhile.jpg", seed=4)
    wait_until(lambda: totals(settings)["predictions"] == 1, 60, "still classifying on the old settings")

    config_file.write_text(good.replace(str(tiny_model), str(flag_everything_model)))
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: service.lines().count("READY=1") == 2, 30, "started over on the mended configuration")
    assert status_json(config_file)["faults"] == {} and service.process.poll() is None
    drop(settings.paths.intake, "after.jpg", seed=5)
    wait_until(lambda: _flagged(settings) == 1, 60, "judged by the model the configuration now names")
    assert service.stop() == 0


def test_run_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model]\npath = "missing.tflite"\n')
    result = subprocess.run([sys.executable, "-m", "dermwatch", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: model file {tmp_path / 'missing.tflite'} does not exist"]


def test_importing_the_service_does_not_import_tensorflow() -> None:
    code = (
        "import sys, dermwatch.cli, dermwatch.watcher.service, dermwatch.pipeline.process, "
        "dermwatch.pipeline.classifier; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'keras'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
