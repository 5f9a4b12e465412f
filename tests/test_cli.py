"""The command line as a user meets it: output formats, status, schema commands, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from click.testing import CliRunner
from conftest import write_jpeg

from dermwatch.cli import cli
from dermwatch.config import Settings
from dermwatch.labels import CLASS_NAMES
from dermwatch.store.db import alembic_config, head_revision


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_classify_csv_has_the_promised_header_and_moves_nothing(config_file: Path, tmp_path: Path) -> None:
    images = [write_jpeg(tmp_path / "pics" / f"{i}.jpg", seed=i) for i in range(3)]
    result = invoke("classify", "--config", str(config_file), "--format", "csv", str(tmp_path / "pics"))
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", *CLASS_NAMES, "label", "flagged"]
    assert [Path(r[0]).name for r in rows[1:]] == ["0.jpg", "1.jpg", "2.jpg"]
    for row in rows[1:]:
        assert sum(float(p) for p in row[1:10]) == pytest.approx(1.0, abs=1e-3)
        assert row[10] in CLASS_NAMES and row[11] in {"True", "False"}
    assert all(p.is_file() for p in images)
    assert not (tmp_path / "dermwatch.db").exists()


def test_classify_json_and_an_unreadable_file(config_file: Path, tmp_path: Path) -> None:
    good = write_jpeg(tmp_path / "good.jpg", seed=1)
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    result = invoke("classify", "--config", str(config_file), "--format", "json", str(good), str(bad))
    assert result.exit_code == 1
    (row,) = json.loads(result.stdout)
    assert row["path"] == str(good) and set(CLASS_NAMES) <= set(row) and isinstance(row["flagged"], bool)
    assert f"error: {bad}: not an image file Pillow can read" in result.stderr


def test_process_then_status(any_database_config: Path, tmp_path: Path) -> None:
    config_file = any_database_config
    folder = tmp_path / "batch"
    for i in range(20):
        write_jpeg(folder / f"{i:02d}.jpg", seed=100 + i)
    (folder / "notes.jpg").write_text("not an image")
    result = invoke("process", "--config", str(config_file), str(folder))
    assert result.exit_code == 0, result.output
    assert "20 classified, 1 rejected" in result.stdout
    assert "rejected: notes.jpg: not an image file" in result.stderr
    status = json.loads(invoke("--config", str(config_file), "status", "--json").stdout)  # before works too
    assert {k: status[k] for k in ("images", "predictions", "quarantined", "pending")} == {
        "images": 20, "predictions": 20, "quarantined": 1, "pending": 0}
    assert status["flagged"] >= 0 and status["model"].startswith("tiny-test-model test")
    assert status["db_revision"] == status["db_head"] == head_revision()
    text = invoke("status", "--config", str(config_file)).stdout  # for people: no Python reprs
    assert "{" not in text and "[" not in text and "'" not in text
    assert "       quarantined: 1\n" in text


def test_db_check_and_an_out_of_date_schema(config_file: Path, settings: Settings) -> None:
    assert invoke("db", "check", "--config", str(config_file)).exit_code == 1
    assert f"database at revision {head_revision()}" in invoke("db", "upgrade", "--config", str(config_file)).stdout
    assert invoke("db", "check", "--config", str(config_file)).exit_code == 0
    command.downgrade(alembic_config(settings.database_url), "0001")  # as if left at the first schema
    result = subprocess.run([sys.executable, "-m", "dermwatch", "run", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: database schema is at revision 0001, this version needs {head_revision()}: "
        "run `dermwatch db upgrade` (back up the database first)")
    assert invoke("db", "upgrade", "--config", str(config_file)).exit_code == 0
    assert invoke("db", "check", "--config", str(config_file)).exit_code == 0


def test_config_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("[watcher]\nsettle = 1\n")
    result = subprocess.run([sys.executable, "-m", "dermwatch", "status", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"error: {bad}: unknown key [watcher] settle\n"


def test_status_without_a_model_says_what_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model]\npath = "none.tflite"\n')
    assert invoke("db", "upgrade", "--config", str(config)).exit_code == 0
    result = invoke("status", "--config", str(config), "--json")
    assert result.exit_code == 1  # a service without its model classifies nothing
    status = json.loads(result.stdout)
    assert status["model"] is None and "does not exist" in status["model_error"]
    assert status["service"] == "not running" and status["threshold"] is None


@pytest.mark.parametrize("command_line", [["status"], ["status", "--json"], ["report"], ["db", "check"]])
def test_looking_at_a_folder_with_no_installation_creates_nothing(tmp_path: Path, command_line: list[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    result = subprocess.run([sys.executable, "-m", "dermwatch", *command_line, "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no database at {tmp_path / 'var' / 'dermwatch.db'}: nothing has run with this configuration yet "
        "(start the service with `dermwatch run`, or pass the service's --config)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


@pytest.mark.parametrize("url, message", [
    ("postgres://u@localhost/d", "error: [database] url: SQLAlchemy has no database type 'postgres' "
                                 "(PostgreSQL is postgresql+psycopg://…)"),
    ("postgresql+psycopg2://u@localhost/d", "error: [database] url needs a driver that is not installed (psycopg2): "
                                            "pip install 'dermwatch[postgres]' and write the URL as "
                                            "postgresql+psycopg://user@host/dbname"),
])
def test_database_url_mistakes_are_one_line_naming_the_fix(tmp_path: Path, url: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    result = subprocess.run([sys.executable, "-m", "dermwatch", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [message]


def _run_once(config: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermwatch", "run", "--config", str(config), *options],
                          capture_output=True, text=True, timeout=60)


def test_a_malformed_sqlite_url_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "sqlite://var/dermwatch.db"\n')
    for command_line in (["run"], ["status"], ["db", "upgrade"]):
        result = subprocess.run([sys.executable, "-m", "dermwatch", *command_line, "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            "error: [database] url 'sqlite://var/dermwatch.db': a SQLite URL has no host; write three slashes before "
            "a relative path (sqlite:///var/dermwatch.db) and four before an absolute one "
            "(sqlite:////srv/dermwatch/dermwatch.db)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


@pytest.fixture(scope="module")
def password_server():
    from postgres_server import PostgresServer

    server = PostgresServer(password="right-password")
    yield server
    server.stop()


@pytest.mark.parametrize("mistake, refusal", [
    ("database", 'database "no_such_database" does not exist (create the database'),
    ("role", 'role "no_such_role" does not exist (create the role'),
    ("password", 'password authentication failed for user "postgres" (check the user and password in the URL)'),
])
def test_run_refuses_a_postgresql_url_mistake_in_one_line(tmp_path: Path, password_server, postgres_server,
                                                          mistake: str, refusal: str) -> None:
    # With passwords, an unknown role is also a failed password (the server does not tell which).
    url = (postgres_server if mistake == "role" else password_server).new_database()
    url = {"database": re.sub(r"@/[^?]+", "@/no_such_database", url),  # ...://USER[:PASSWORD]@/NAME?host=SOCKET
           "role": url.replace("postgres@", "no_such_role@"),
           "password": url.replace("right-password", "wrong-password")}[mistake]
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    for command_line in (["run"], ["report"], ["status"], ["db", "upgrade"]):
        result = subprocess.run([sys.executable, "-m", "dermwatch", *command_line, "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: [database] url: the server refused the connection: ") and refusal in line
        assert "right-password" not in result.stderr and "wrong-password" not in result.stderr


def test_run_waits_out_a_server_that_is_not_there_yet_and_stops_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "postgresql+psycopg://postgres@/d?host={tmp_path}"\n')
    service = subprocess.Popen([sys.executable, "-m", "dermwatch", "run", "--config", str(config)],
                               stderr=subprocess.PIPE, text=True)
    try:
        first = service.stderr.readline()
        assert "waiting for the database before starting: database unavailable: " in first, first
        service.terminate()
        assert service.wait(30) == 0
        assert "Traceback" not in service.stderr.read()
    finally:
        service.kill()


def test_a_configured_intake_that_does_not_exist_is_refused_unless_asked_to_create_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[paths]\nintake = "intkae"\n[model]\npath = "none.tflite"\n')
    result = _run_once(config)
    assert result.returncode == 1  # the model is checked first, and nothing is made
    assert result.stderr.splitlines() == [f"error: model file {tmp_path / 'none.tflite'} does not exist"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
    config.write_text('[paths]\nintake = "intkae"\n')
    result = _run_once(config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: [paths] intake: {tmp_path / 'intkae'} does not exist (a typo? create it, or start the service once "
        "with `dermwatch run --create-intake`)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
    service = subprocess.Popen([sys.executable, "-m", "dermwatch", "run", "--config", str(config), "--create-intake"],
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in service.stderr:
            if "watching" in line:
                break
        assert (tmp_path / "intkae").is_dir()
        service.terminate()
        assert service.wait(30) == 0
    finally:
        service.kill()
