"""Nothing stops intake: odd names, unreadable files, a full disk, a locked database, a second
service, late sidecars, slow writers. Each test makes its own files and runs the real service."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import status_json, totals, wait_until, write_jpeg
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from dermwatch.config import Settings, load_settings
from dermwatch.store.models import Rejection, Sighting

JAPANESE_82 = "皮膚" * 41 + ".jpg"  # 82 characters, 250 bytes: the claim may not lengthen it
LONG_ASCII = "x" * 246 + ".jpg"  # 250 bytes
LATIN1 = os.fsdecode(b"Patient M\xfcller caf\xe9.jpg")  # not UTF-8: a Latin-1 client


def drop(intake: Path, name: str, seed: int, sidecar: dict | None = None) -> Path:
    """Write beside the intake folder, then rename in (sidecar first), as a careful client does."""
    staging = intake.parent / "staging"
    staging.mkdir(exist_ok=True)
    if sidecar is not None:
        stem = Path(name).stem
        (staging / f"{stem}.json").write_text(json.dumps(sidecar))
        (staging / f"{stem}.json").rename(intake / f"{stem}.json")
    return write_jpeg(staging / name, seed).rename(intake / name)


def left_over(settings: Settings) -> list[str]:
    return [p.name for p in settings.paths.intake.rglob("*") if p.is_file()] + [
        p.name for p in settings.paths.work.iterdir()]


def without_file_permission_override() -> tuple[str, ...]:
    """Run as root without CAP_DAC_OVERRIDE, so file modes apply as to the service's own user."""
    if os.geteuid() != 0:
        return ()
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def test_odd_names_are_classified_and_kept_exactly(start_service, settings: Settings) -> None:
    service = start_service()
    odd = [LATIN1, JAPANESE_82, LONG_ASCII]
    for i, name in enumerate(odd):
        drop(settings.paths.intake, name, seed=100 + i)
    for i in range(20):
        drop(settings.paths.intake, f"after-{i:02d}.jpg", seed=200 + i)
    wait_until(lambda: totals(settings)["predictions"] == 23, 60, "all 23 images classified")
    assert service.process.poll() is None and service.stop() == 0
    assert left_over(settings) == [] and totals(settings)["quarantined"] == 0
    with Session(create_engine(settings.database_url)) as session:
        by_name = {s.original_name: s for s in session.scalars(select(Sighting))}
    latin1 = by_name["Patient M\\xfcller caf\\xe9.jpg"]  # shown with its odd bytes escaped
    assert latin1.original_name_bytes == b"Patient M\xfcller caf\xe9.jpg"  # kept exactly
    assert by_name[JAPANESE_82].original_name_bytes is None and LONG_ASCII in by_name
    archived = [p.name for p in settings.paths.archive.rglob("*.jpg")]
    assert len(archived) == 23 and all(len(name.encode()) <= 255 for name in archived)
    assert any(name.endswith("-Patient M\\xfcller caf\\xe9.jpg") for name in archived)


def test_a_bad_file_left_in_work_by_a_crash_cannot_stop_the_restart(config_file: Path, start_service,
                                                                    settings: Settings) -> None:
    settings.paths.work.mkdir(parents=True)
    (settings.paths.work / "00000000000000000000dead").mkdir()
    (settings.paths.work / "00000000000000000000dead" / LATIN1).write_bytes(b"\xff\xd8 half a JPEG")
    service = start_service()
    drop(settings.paths.intake, "fine.jpg", seed=1)
    wait_until(lambda: totals(settings)["predictions"] == 1 and totals(settings)["quarantined"] == 1, 30,
               "the leftover quarantined, the new image classified")
    assert service.stop() == 0 and left_over(settings) == []


def test_unreadable_file_and_unwritable_folder_do_not_stop_the_service(start_service, settings: Settings) -> None:
    intake = settings.paths.intake
    intake.mkdir(parents=True, exist_ok=True)
    locked_folder = intake / "locked"
    write_jpeg(locked_folder / "stuck.jpg", seed=5)
    locked_folder.chmod(0o555)  # the service may list it, not move files out of it
    write_jpeg(intake / "secret.jpg", seed=6).chmod(0o000)  # the service may not read it
    try:
        service = start_service(prefix=without_file_permission_override())
        for i in range(5):
            drop(intake, f"ok-{i}.jpg", seed=10 + i)
        wait_until(lambda: totals(settings)["predictions"] == 5 and totals(settings)["quarantined"] == 2, 60,
                   "5 classified, 2 rejected")
        time.sleep(2.5)  # two rescans (every 2 s here): still one row for the file that stays
        assert service.process.poll() is None and service.stop() == 0
    finally:
        locked_folder.chmod(0o755)
    with Session(create_engine(settings.database_url)) as session:
        reasons = {r.original_name: r.reason for r in session.scalars(select(Rejection))}
    assert "cannot read the file: Permission denied" in reasons["secret.jpg"]
    assert "cannot take it out of the intake folder (Permission denied); it stays there" in reasons["stuck.jpg"]
    assert totals(settings)["quarantined"] == 2
    assert (locked_folder / "stuck.jpg").is_file()
    # Its rights mended, it is taken and counted once: classified, its old record withdrawn.
    service = start_service(prefix=without_file_permission_override())
    wait_until(lambda: totals(settings)["predictions"] == 6, 60, "the mended file classified")
    assert service.stop() == 0
    assert totals(settings)["quarantined"] == 1 and totals(settings)["sightings"] == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="simulating a full disk mounts a small tmpfs, which needs root")
def test_a_full_disk_is_waited_out_and_the_backlog_clears(config_file: Path, start_service, tmp_path: Path) -> None:
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        config_file.write_text(config_file.read_text().replace('state = "state"', f'state = "{disk}/state"')
                               .replace("sqlite:///dermwatch.db", f"sqlite:///{disk}/dermwatch.db"))
        settings = load_settings(config_file)
        service = start_service()
        drop(settings.paths.intake, "before.jpg", seed=1)
        wait_until(lambda: totals(settings)["predictions"] == 1, 30, "the first image")
        filler = disk / "filler"
        with filler.open("wb", buffering=0) as handle:  # fill the disk to the last byte
            try:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
            except OSError:
                pass
        for i in range(5):
            drop(settings.paths.intake, f"during-{i}.jpg", seed=10 + i)
        wait_until(lambda: any("disk full" in s for s in service.statuses()), 30, "STATUS= says the disk is full")
        assert any("disk full" in fault["message"] for fault in status_json(config_file)["faults"].values())
        assert service.process.poll() is None
        filler.unlink()
        wait_until(lambda: totals(settings)["predictions"] == 6, 90, "the backlog cleared by itself")
        assert service.stop() == 0
        assert left_over(settings) == [] and totals(settings)["quarantined"] == 0
        assert "disk full" in service.log_path.read_text()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_database_locked_past_the_busy_timeout_is_waited_out(config_file: Path, start_service) -> None:
    config_file.write_text(config_file.read_text().replace("[database]\n", "[database]\nbusy_timeout_seconds = 0.5\n"))
    settings = load_settings(config_file)
    service = start_service()
    locker = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
    try:
        for i in range(8):
            drop(settings.paths.intake, f"while-locked-{i}.jpg", seed=40 + i)
        wait_until(lambda: any("database is locked" in s for s in service.statuses()), 30,
                   "STATUS= says the database is locked")
        faults = status_json(config_file)["faults"]
        assert "database is locked" in faults["intake"]["message"]
        assert service.process.poll() is None and totals(settings)["predictions"] == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wait_until(lambda: totals(settings)["predictions"] == 8, 90, "the backlog cleared once the lock was gone")
    wait_until(lambda: status_json(config_file)["faults"] == {}, 10, "status clear again")
    assert service.stop() == 0 and left_over(settings) == []


def test_status_shows_a_database_lock_at_once_not_only_after_the_busy_timeout(config_file: Path,
                                                                            start_service) -> None:
    """With the default busy_timeout (30 s) a write waits that long inside one call; `status`
    shows the hold-up within seconds anyway."""
    settings = load_settings(config_file)
    assert settings.busy_timeout_seconds == 30
    service = start_service()
    locker = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        drop(settings.paths.intake, "while-locked.jpg", seed=49)
        wait_until(lambda: "intake" in status_json(config_file)["faults"], 25, "the hold-up in status, before 30 s")
        assert "storing 1 arrival(s) in the database" in status_json(config_file)["faults"]["intake"]["message"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wait_until(lambda: totals(settings)["predictions"] == 1, 60, "stored once the lock was gone")
    wait_until(lambda: status_json(config_file)["faults"] == {}, 10, "status clear again")
    assert service.stop() == 0


def test_a_second_service_on_the_same_installation_refuses_at_once(config_file: Path, start_service) -> None:
    first = start_service()
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "dermwatch", "run", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and time.monotonic() - started < 20
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: another dermwatch service (PID {first.process.pid}) is running on this "
                           "installation")
    assert status_json(config_file)["service"] == f"running (PID {first.process.pid})"
    assert first.process.poll() is None and first.stop() == 0
    assert status_json(config_file)["service"] == "not running"


def test_process_beside_the_running_service_sends_no_alert_twice(any_database_config: Path, tiny_model: Path,
                                                                 flag_everything_model: Path, start_service,
                                                                 tmp_path: Path) -> None:
    config_file = any_database_config
    sent = tmp_path / "alerts.log"
    config_file.write_text(
        config_file.read_text().replace(str(tiny_model), str(flag_everything_model))
        + f"""[alerts]\ncommand = "sh -c 'sleep 0.05; echo $DERMWATCH_IMAGE_ID >> {sent}'"\n""")
    settings = load_settings(config_file)
    service = start_service()
    batch = tmp_path / "batch"
    for i in range(25):
        write_jpeg(batch / f"p{i:02d}.jpg", seed=300 + i)
    writer = threading.Thread(target=lambda: [drop(settings.paths.intake, f"s{i:02d}.jpg", seed=400 + i)
                                              for i in range(25)])
    writer.start()
    result = subprocess.run([sys.executable, "-m", "dermwatch", "process", "--config", str(config_file), str(batch)],
                            capture_output=True, text=True, timeout=120)
    writer.join()
    assert result.returncode == 0, result.stderr
    wait_until(lambda: totals(settings)["predictions"] == 50, 60, "50 predictions")
    wait_until(lambda: sent.exists() and len(sent.read_text().split()) >= 50, 60, "50 alerts")
    time.sleep(2)  # room for a second send, were there one
    assert service.stop() == 0
    ids = sent.read_text().split()
    assert len(ids) == len(set(ids)) == 50


def test_a_sidecar_that_comes_after_its_image_is_attached(config_file: Path, start_service) -> None:
    config_file.write_text(config_file.read_text() + "sidecar_grace_seconds = 6\n")
    settings = load_settings(config_file)
    service = start_service()
    drop(settings.paths.intake, "late.jpg", seed=50)
    wait_until(lambda: totals(settings)["predictions"] == 1, 30, "the image classified")
    time.sleep(3)
    (settings.paths.intake / "late.json").write_text('{"patient_reference": "P-LATE", "notes": "came 3 s later"}')
    (settings.paths.intake / "orphan.json").write_text('{"patient_reference": "P-NONE"}')
    wait_until(lambda: totals(settings)["quarantined"] == 1, 30, "the orphan quarantined after its grace")
    assert service.stop() == 0 and left_over(settings) == []
    with Session(create_engine(settings.database_url)) as session:
        assert session.scalars(select(Sighting)).one().sidecar == {"patient_reference": "P-LATE",
                                                                    "notes": "came 3 s later"}
        (rejection,) = session.scalars(select(Rejection)).all()
    assert rejection.original_name == "orphan.json" and "sidecar with no image" in rejection.reason
    assert len(list(settings.paths.archive.rglob("*-late.json"))) == 1


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_writer_that_reopens_and_appends_gives_one_image(config_file: Path, start_service, polling: bool) -> None:
    if polling:  # and the fixture's settle_seconds of 0.5, far shorter than the writer's pauses
        config_file.write_text(config_file.read_text() + "polling = true\n")
    settings = load_settings(config_file)
    service = start_service()
    data = write_jpeg(config_file.parent / "whole.jpg", seed=9, size=(640, 480)).read_bytes()
    target = settings.paths.intake / "chunked.jpg"
    pauses = [0.3] * 8 + [3.0, 2.5]  # a client that reopens per chunk, then a copy that stalls twice
    for i, pause in enumerate(pauses):
        with target.open("ab") as handle:
            handle.write(data[i * len(data) // len(pauses) : (i + 1) * len(data) // len(pauses)])
        time.sleep(pause)
    wait_until(lambda: totals(settings)["predictions"] == 1, 30, "the image classified")
    time.sleep(1)
    assert service.stop() == 0
    assert totals(settings)["quarantined"] == 0 and left_over(settings) == []


@pytest.mark.parametrize("umask", [0o027, 0o022], ids=["unit", "login-shell"])
def test_report_files_and_the_archive_follow_the_umask_and_are_never_open_to_others(
        config_file: Path, start_service, umask: int) -> None:
    """The unit's umask (027), and a shell's (022) as in the quick start: other users get nothing."""
    # Today's report is refreshed at most every refresh_minutes: a short one, so it shows both files.
    config_file.write_text(config_file.read_text() + "[reports]\nrefresh_minutes = 0.02\n")
    settings = load_settings(config_file)
    service = start_service(umask=umask)
    image = drop(settings.paths.intake, "mole.jpg", seed=60, sidecar={"patient_reference": "P-9"})
    assert image.name == "mole.jpg"
    (settings.paths.intake / "broken.jpg").write_bytes(b"not an image")
    wait_until(lambda: len(list(settings.paths.reports.glob("*.csv"))) == 1 and totals(settings)["quarantined"],
               30, "a report")
    wait_until(lambda: "P-9" in next(settings.paths.reports.glob("*.csv")).read_text(), 30, "the report has P-9")
    assert service.stop() == 0
    written = [*settings.paths.reports.iterdir(), *settings.paths.archive.rglob("*"),
               *settings.paths.quarantine.rglob("*")]
    assert len(written) >= 8
    for path in [*written, settings.paths.reports, settings.paths.archive]:
        assert path.stat().st_mode & 0o007 == 0, f"{path} is open to other users"


def test_status_line_and_log_priorities_under_systemd(tmp_path: Path, config_file: Path) -> None:
    folder = tmp_path / "in"
    (folder / "broken.jpg").parent.mkdir()
    (folder / "broken.jpg").write_bytes(b"nope")
    log = tmp_path / "journal"
    with log.open("wb") as stream:
        stat = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        subprocess.run([sys.executable, "-m", "dermwatch", "process", "--config", str(config_file), str(folder)],
                       stdout=subprocess.DEVNULL, stderr=stream, env=env, timeout=60, check=True)
    lines = [line for line in log.read_text().splitlines() if line.startswith("<")]
    assert any(line.startswith("<4>dermwatch.pipeline.process: broken.jpg: rejected") for line in lines)
    assert any(line.startswith("<6>") for line in lines)


def test_a_subfolder_the_service_cannot_list_is_reported_not_skipped_in_silence(start_service, config_file: Path,
                                                                               settings: Settings) -> None:
    """A fault in `status` (and one log line, not one per scan) until its rights are mended;
    then the files in it are taken."""
    hidden = settings.paths.intake / "closed"
    write_jpeg(hidden / "inside.jpg", seed=70)
    hidden.chmod(0o000)
    try:
        service = start_service(prefix=without_file_permission_override())
        drop(settings.paths.intake, "open.jpg", seed=71)
        wait_until(lambda: totals(settings)["predictions"] == 1, 30, "the reachable image")
        wait_until(lambda: "intake folders" in status_json(config_file)["faults"], 30, "the folder shown in status")
        message = status_json(config_file)["faults"]["intake folders"]["message"]
        assert message.startswith(f"cannot look into {hidden} (Permission denied)")
        time.sleep(2.5)  # a rescan or two: one log line, not one per scan
    finally:
        hidden.chmod(0o755)
    wait_until(lambda: totals(settings)["predictions"] == 2, 30, "the image in the mended folder taken")
    wait_until(lambda: status_json(config_file)["faults"] == {}, 30, "the fault cleared")
    assert service.stop() == 0
    log = service.log_path.read_text()
    assert log.count(f"ERROR dermwatch.watcher.health: intake folders: cannot look into {hidden} (Perm") == 1
    assert "intake folders: working again" in log
